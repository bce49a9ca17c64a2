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
