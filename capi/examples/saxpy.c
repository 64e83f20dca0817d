/* y = a*x + y on the device over two malloc'd float arrays; the CPU checks y.
 *
 *   capi/examples/build.sh && target/capi-examples/saxpy [auto|cpu|wgpu|vulkan] [n]
 *
 * WGSL for the GPU drivers (wgpu, vulkan), with named parameters, and a C
 * callback for the cpu driver, which reaches memory only through the
 * hmm_lane_* accessors (arguments by position, in declaration order). Exits nonzero on any error or wrong element. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "hmm.h"

/* Parameters declared once, by name and kind: the WGSL reads args.x,
 * args.y, args.a, and every launch's arguments are checked against the
 * declaration (a wrong count or kind is HMM_INVALID_ARGUMENT). */
static const char SAXPY_PARAMS[] = "x: ptr, y: ptr, a: f32";

static const char SAXPY_WGSL[] =
    "fn hmm_kernel(i: u32) {\n"
    "    let yp = hmm_index(args.y, i, 4u);\n"
    "    let xi = hmm_load_f32(hmm_index(args.x, i, 4u));\n"
    "    hmm_store_f32(yp, args.a * xi + hmm_load_f32(yp));\n"
    "}\n";

/* The cpu driver's version: argument words, then checked loads and stores.
 * A nonzero accessor result (usually a page fault the library services
 * before calling us again for the same i) is returned at once. */
static int saxpy_cpu(hmm_lane *lane, uint32_t i, void *ctx) {
    (void)ctx;
    uint64_t x = hmm_lane_arg(lane, 0), y = hmm_lane_arg(lane, 1);
    float a = hmm_lane_arg_f32(lane, 2);
    uint64_t off = (uint64_t)i * sizeof(float);
    float xi, yi;
    if (hmm_lane_load_f32(lane, x + off, &xi) != HMM_OK) return 1;
    if (hmm_lane_load_f32(lane, y + off, &yi) != HMM_OK) return 1;
    if (hmm_lane_store_f32(lane, y + off, a * xi + yi) != HMM_OK) return 1;
    return 0;
}

static int fail(const char *what, const hmm_status *st) {
    fprintf(stderr, "saxpy: %s: %s: %s\n", what, hmm_status_code_name(st->code), st->message);
    return 1;
}

int main(int argc, char **argv) {
    const char *driver = argc > 1 ? argv[1] : "auto";
    uint32_t n = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 10) : 1u << 20;
    hmm_status st;

    hmm_device *dev = hmm_device_open(driver, &st);
    if (!dev) return fail("open", &st);
    printf("%s\n", hmm_device_note(dev));
    hmm_mirror *m = hmm_mirror_new(dev, NULL, &st); /* consumes dev */
    if (!m) return fail("mirror", &st);
    hmm_kernel *k = hmm_kernel_new_with_params(m, SAXPY_PARAMS, SAXPY_WGSL, saxpy_cpu, NULL, &st);
    if (!k) return fail("kernel", &st);

    float a = 2.5f;
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y), *y0 = malloc(n * sizeof *y0);
    if (!x || !y || !y0) return 1;
    for (uint32_t i = 0; i < n; i++) {
        x[i] = (float)(i % 1000) * 0.5f;
        y[i] = y0[i] = (float)(i % 7);
    }

    hmm_arg args[] = {hmm_arg_ptr(x), hmm_arg_ptr(y), hmm_arg_f32(a)};
    /* A double where the kernel declares f32 is refused before anything
     * runs, naming the argument. */
    hmm_arg wrong[] = {hmm_arg_ptr(x), hmm_arg_ptr(y), hmm_arg_f64(a)};
    if (hmm_launch(m, k, n, wrong, 3, NULL, &st) != HMM_INVALID_ARGUMENT) {
        fprintf(stderr, "saxpy: a wrong-kind argument was not refused\n");
        return 1;
    }
    printf("refused as declared: %s\n", st.message);
    hmm_launch_report r;
    if (hmm_launch(m, k, n, args, 3, &r, &st) != HMM_OK) return fail("launch", &st);
    printf("saxpy over %u elements on %s: %llu pages in, %llu pages out, %u submissions\n", n,
           hmm_mirror_driver(m), (unsigned long long)r.pages_in, (unsigned long long)r.pages_out,
           r.submissions);

    /* The device may fuse a*x+y into one FMA: allow one rounding step. */
    uint32_t bad = 0;
    for (uint32_t i = 0; i < n; i++) {
        float want = a * x[i] + y0[i];
        if (fabsf(y[i] - want) > fabsf(want) * 1e-6f + 1e-6f) bad++;
    }

    /* The same launch again, non-blocking: overlap is the caller's to use;
     * the CPU leaves x and y alone until the wait returns. */
    hmm_launch_handle *h = hmm_launch_async(m, k, n, args, 3, &st);
    if (!h) return fail("launch_async", &st);
    if (hmm_launch_wait(h, NULL, &st) != HMM_OK) return fail("launch_wait", &st);
    for (uint32_t i = 0; i < n; i++) {
        float want = a * x[i] + (a * x[i] + y0[i]);
        if (fabsf(y[i] - want) > fabsf(want) * 2e-6f + 2e-6f) bad++;
    }

    hmm_stats s;
    if (hmm_mirror_stats(m, &s, &st) != HMM_OK) return fail("stats", &st);
    printf("stats: %llu launches, %llu faults, %llu pages in, %llu pages out\n",
           (unsigned long long)s.launches, (unsigned long long)s.faults,
           (unsigned long long)s.pages_in, (unsigned long long)s.pages_out);

    hmm_kernel_free(k);
    hmm_mirror_free(m);
    free(x);
    free(y);
    free(y0);
    if (bad) {
        fprintf(stderr, "saxpy: %u of %u elements wrong\n", bad, n);
        return 1;
    }
    printf("saxpy: all %u elements correct (blocking and non-blocking launch)\n", n);
    return 0;
}
