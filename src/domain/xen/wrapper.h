/* The Xen tool-stack headers castor's `xen` domain binds (bindgen input). */
#include <xenctrl.h>
#include <xenguest.h>
#include <xenforeignmemory.h>
#include <xenevtchn.h>
#include <xenstore.h>
#include <xen/hvm/params.h>
/* Exported by libxenctrl (VERS_4.17.0) but declared only in its private
 * xc_private.h; Xen's own save (libxenguest) calls it for PV page types. */
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr);
