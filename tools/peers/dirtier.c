/* A guest workload that dirties pages at a known rate, for comparing QEMU
 * live migration with castor's sim domain on the same page stream.
 *
 *   dirtier MIB RATE EDIT
 *
 * Fills MIB MiB of anonymous memory with text (words from a fixed
 * alphabet, compressible like castor's sim pages), then, every 10 ms,
 * writes RATE/100 pages chosen at random: EDIT bytes at a random offset of
 * each (EDIT=4096 rewrites the whole page). Prints "dirtier: ready" once
 * the fill is done and a line per second with the pages written, so the
 * rate the guest actually achieved is on its console.
 *
 * The same shape as `castor bench --domain sim:workload=edits,edit=EDIT,
 * rate=RATE`: a random page of the working set, EDIT bytes of new text.
 * Built static (gcc -static -O2) into the initramfs of
 * tools/peers/qemu-migrate.sh. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next(void)
{
	/* splitmix64 */
	uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void text(unsigned char *p, size_t n)
{
	static const char alpha[] = "etaoinshrdlucmfwyp ";
	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)alpha[next() % (sizeof alpha - 1)];
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: dirtier MIB RATE EDIT\n");
		return 2;
	}
	size_t pages = (size_t)atol(argv[1]) * 256;
	long rate = atol(argv[2]);
	size_t edit = (size_t)atol(argv[3]);
	if (pages == 0 || rate <= 0 || edit == 0 || edit > 4096) {
		fprintf(stderr, "dirtier: bad arguments\n");
		return 2;
	}
	unsigned char *mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (mem == MAP_FAILED) {
		perror("dirtier: mmap");
		return 1;
	}
	text(mem, pages * 4096);
	printf("dirtier: ready %zu pages, %ld pages/s, %zu bytes each\n", pages, rate, edit);
	fflush(stdout);
	double t0 = now(), tick = t0, report = t0 + 1.0;
	long per_tick = rate / 100 > 0 ? rate / 100 : 1;
	unsigned long done = 0, last = 0;
	for (;;) {
		for (long i = 0; i < per_tick; i++) {
			size_t pg = next() % pages;
			size_t off = edit == 4096 ? 0 : next() % (4096 - edit + 1);
			text(mem + pg * 4096 + off, edit);
		}
		done += per_tick;
		tick += 0.01;
		double t = now();
		if (tick > t) {
			struct timespec d = { 0, (long)((tick - t) * 1e9) };
			nanosleep(&d, NULL);
		} else if (t - tick > 0.1) {
			tick = t; /* fell behind (slow TCG): no catch-up burst */
		}
		if (t >= report) {
			printf("dirtier: %lu pages/s\n", done - last);
			fflush(stdout);
			last = done;
			report += 1.0;
		}
	}
}
