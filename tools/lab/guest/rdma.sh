# Profile rdma: a Soft-RoCE device (rxe0) over a dummy netdev d0 holding
# 10.9.0.1/24, the address castor's rdma transport binds and connects to.
ip link set lo up
ip link add d0 type dummy || lab_fail "ip link add d0 type dummy"
ip addr add 10.9.0.1/24 dev d0
ip link set d0 up
rdma link add rxe0 type rxe netdev d0 || lab_fail "rdma link add rxe0 type rxe netdev d0"
export CASTOR_LAB_RDMA_ADDR=10.9.0.1
# `castor bench` listens and connects here instead of 127.0.0.1.
export CASTOR_BENCH_ADDR=10.9.0.1
