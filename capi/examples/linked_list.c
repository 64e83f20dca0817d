/* The device walks linked lists of individually malloc'd nodes, following
 * the CPU's own `next` pointers, and sums each list; the CPU checks every
 * sum.
 *
 *   capi/examples/build.sh && target/capi-examples/linked_list [auto|cpu|wgpu|vulkan] [lists] [nodes]
 *
 * Invocation i walks list i. The field offsets come from offsetof() and
 * travel as declared, named arguments (args.next_off, args.value_off), so
 * the kernels hard-code no layout. Nodes of
 * different lists are allocated interleaved, so every list is scattered
 * over the heap: the device faults in the heap pages it walks. Exits
 * nonzero on any error or wrong sum. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include "hmm.h"

struct node {
    struct node *next;
    uint32_t value;
};

static const char LIST_SUM_PARAMS[] = "heads: ptr, sums: ptr, next_off: u32, value_off: u32";

static const char LIST_SUM_WGSL[] =
    "fn hmm_kernel(i: u32) {\n"
    "    var node = hmm_load_ptr(hmm_index(args.heads, i, 8u));\n"
    "    var sum = 0u;\n"
    "    loop {\n"
    "        if hmm_is_null(node) || hmm_faulted() {\n"
    "            break;\n"
    "        }\n"
    "        sum = sum + hmm_load_u32(hmm_add(node, args.value_off));\n"
    "        node = hmm_load_ptr(hmm_add(node, args.next_off));\n"
    "    }\n"
    "    hmm_store_u32(hmm_index(args.sums, i, 4u), sum);\n"
    "}\n";

static int list_sum_cpu(hmm_lane *lane, uint32_t i, void *ctx) {
    (void)ctx;
    uint64_t heads = hmm_lane_arg(lane, 0), sums = hmm_lane_arg(lane, 1);
    uint64_t next_off = hmm_lane_arg(lane, 2), value_off = hmm_lane_arg(lane, 3);
    uint64_t node;
    uint32_t sum = 0, v;
    if (hmm_lane_load_u64(lane, heads + (uint64_t)i * 8, &node) != HMM_OK) return 1;
    while (node != 0) {
        if (hmm_lane_load_u32(lane, node + value_off, &v) != HMM_OK) return 1;
        sum += v;
        if (hmm_lane_load_u64(lane, node + next_off, &node) != HMM_OK) return 1;
    }
    return hmm_lane_store_u32(lane, sums + (uint64_t)i * 4, sum) != HMM_OK;
}

static int fail(const char *what, const hmm_status *st) {
    fprintf(stderr, "linked_list: %s: %s: %s\n", what, hmm_status_code_name(st->code), st->message);
    return 1;
}

int main(int argc, char **argv) {
    const char *driver = argc > 1 ? argv[1] : "auto";
    uint32_t lists = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 10) : 256;
    uint32_t nodes = argc > 3 ? (uint32_t)strtoul(argv[3], NULL, 10) : 1000;
    hmm_status st;

    hmm_device *dev = hmm_device_open(driver, &st);
    if (!dev) return fail("open", &st);
    printf("%s\n", hmm_device_note(dev));
    hmm_mirror *m = hmm_mirror_new(dev, NULL, &st);
    if (!m) return fail("mirror", &st);
    hmm_kernel *k = hmm_kernel_new_with_params(m, LIST_SUM_PARAMS, LIST_SUM_WGSL, list_sum_cpu, NULL, &st);
    if (!k) return fail("kernel", &st);

    struct node **heads = calloc(lists, sizeof *heads);
    uint32_t *sums = calloc(lists, sizeof *sums), *want = calloc(lists, sizeof *want);
    if (!heads || !sums || !want) return 1;
    /* Round-robin: node j of every list, then node j+1 of every list. */
    for (uint32_t j = 0; j < nodes; j++) {
        for (uint32_t l = 0; l < lists; l++) {
            struct node *n = malloc(sizeof *n);
            if (!n) return 1;
            n->value = (l * 31u + j * 7u) % 1000u;
            n->next = heads[l];
            heads[l] = n;
            want[l] += n->value;
        }
    }

    hmm_arg args[] = {
        hmm_arg_ptr(heads),
        hmm_arg_ptr(sums),
        hmm_arg_u32((uint32_t)offsetof(struct node, next)),
        hmm_arg_u32((uint32_t)offsetof(struct node, value)),
    };
    hmm_launch_report r;
    if (hmm_launch(m, k, lists, args, 4, &r, &st) != HMM_OK) return fail("launch", &st);
    printf("%u lists of %u malloc'd nodes on %s: %llu faults, %llu pages in, %u submissions\n",
           lists, nodes, hmm_mirror_driver(m), (unsigned long long)r.faults,
           (unsigned long long)r.pages_in, r.submissions);

    uint32_t bad = 0;
    for (uint32_t l = 0; l < lists; l++) bad += sums[l] != want[l];

    /* The CPU changes one node of every list; the next launch must see it
     * (the CPU write invalidates the device's copy at the sync point). */
    for (uint32_t l = 0; l < lists; l++) {
        heads[l]->value += 1;
        want[l] += 1;
    }
    if (hmm_launch(m, k, lists, args, 4, &r, &st) != HMM_OK) return fail("relaunch", &st);
    for (uint32_t l = 0; l < lists; l++) bad += sums[l] != want[l];
    printf("after CPU writes: %llu CPU-written pages invalidated, %llu pages in\n",
           (unsigned long long)r.cpu_written_pages, (unsigned long long)r.pages_in);

    hmm_kernel_free(k);
    hmm_mirror_free(m);
    for (uint32_t l = 0; l < lists; l++) {
        for (struct node *n = heads[l], *next; n; n = next) {
            next = n->next;
            free(n);
        }
    }
    free(heads);
    free(sums);
    free(want);
    if (bad) {
        fprintf(stderr, "linked_list: %u wrong sums\n", bad);
        return 1;
    }
    printf("linked_list: all %u sums correct, before and after CPU writes\n", lists);
    return 0;
}
