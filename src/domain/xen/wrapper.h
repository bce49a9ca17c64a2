/* The Xen tool-stack headers castor's `xen` domain binds (bindgen input). */
#include <xenctrl.h>
#include <xenguest.h>
#include <xenforeignmemory.h>
#include <xenevtchn.h>
#include <xenstore.h>
#include <xen/hvm/params.h>
