# Profile xen: this is a PV dom0 under Xen 4.17; start the toolstack's
# daemons (xenstored, xen-init-dom0, xenconsoled) so `xl` works.
[ "$(cat /sys/hypervisor/type 2>/dev/null)" = xen ] || lab_fail "not running under Xen (/sys/hypervisor/type)"
ip link set lo up
mkdir -p /proc/xen /var/run/xen /var/run/xenstored /var/lib/xen /var/lib/xenstored \
    /var/log/xen/console /etc/xen
mount -t xenfs xenfs /proc/xen || lab_fail "mount -t xenfs"
xenstored --pid-file /var/run/xenstored.pid || lab_fail "xenstored"
xen-init-dom0 >/var/log/xen/init-dom0.log 2>&1 || lab_fail "xen-init-dom0: $(cat /var/log/xen/init-dom0.log)"
xenconsoled --pid-file=/var/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console ||
    lab_fail "xenconsoled"
export LD_LIBRARY_PATH=/usr/lib/xen-4.17/lib
# The guests' network: bridge xenbr0 (10.77.0.1/24; a fixed MAC, else the
# bridge takes the lowest port's and changes as vifs come and go), which
# the vif hotplug script /lab/bin/vif-lab enslaves vifs to. br_netfilter
# passes bridged IPv4/IPv6 through iptables, where castor's output commit
# holds a vif's packets (`castor protect --nfqueue Q --nfqueue-dev vifD.0`).
ip link add xenbr0 address 02:00:0a:4d:00:01 type bridge forward_delay 0 stp_state 0 ||
    lab_fail "creating bridge xenbr0"
ip addr add 10.77.0.1/24 dev xenbr0 && ip link set xenbr0 up || lab_fail "configuring xenbr0"
for f in bridge-nf-call-iptables bridge-nf-call-ip6tables; do
    echo 1 >"/proc/sys/net/bridge/$f" || lab_fail "setting net.bridge.$f"
done
