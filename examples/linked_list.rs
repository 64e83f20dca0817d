//! The CPU builds a linked list and a binary tree of `Box` nodes; the
//! device follows the CPU's own `next`/`left`/`right` pointers and sums the
//! values; the CPU checks both sums. No copying, no registration: the
//! device faults the heap pages it walks into its mirror.
//!
//! `cargo run --release --example linked_list -- [--backend ...] [--nodes N]`

use clap::Parser;
use hmm::{KernelSource, MirrorConfig};
use hmm_examples::{open, print_counters, BackendArg};

/// A list node exactly as the device sees it: `next` at byte 0 (a null
/// `Option<Box>` is address 0), `value` at byte 8.
#[repr(C)]
struct Node {
    next: Option<Box<Node>>,
    value: u64,
}

/// A tree node: `left` at 0, `right` at 8, `value` at 16.
#[repr(C)]
struct Tree {
    left: Option<Box<Tree>>,
    right: Option<Box<Tree>>,
    value: u64,
}

const LIST_SUM: KernelSource = KernelSource {
    name: "list_sum",
    wgsl: r#"
fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn hmm_kernel(i: u32) {
    var node = hmm_arg_ptr(0u);
    var sum = vec2<u32>(0u, 0u);
    loop {
        if hmm_is_null(node) || hmm_faulted() {
            break;
        }
        sum = add64(sum, hmm_load_u64(hmm_add(node, 8u)));
        node = hmm_load_ptr(node);
    }
    hmm_store_u64(hmm_arg_ptr(1u), sum);
}
"#,
    cpu: |lane, _| {
        let (mut node, out) = (lane.args()[0], lane.args()[1]);
        let mut sum = 0u64;
        while node != 0 {
            sum = sum.wrapping_add(lane.load_u64(node + 8)?);
            node = lane.load_u64(node)?;
        }
        lane.store_u64(out, sum)
    },
};

const TREE_SUM: KernelSource = KernelSource {
    name: "tree_sum",
    wgsl: r#"
fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

// Depth-first with an explicit stack; a deeper tree than the stack holds
// sets word 1 of the output (the CPU reports it) instead of a wrong sum.
fn hmm_kernel(i: u32) {
    var stack: array<vec2<u32>, 64>;
    var top = 0u;
    var sum = vec2<u32>(0u, 0u);
    var overflow = 0u;
    stack[0] = hmm_arg_ptr(0u);
    top = 1u;
    loop {
        if top == 0u || hmm_faulted() {
            break;
        }
        top = top - 1u;
        let node = stack[top];
        if hmm_is_null(node) {
            continue;
        }
        sum = add64(sum, hmm_load_u64(hmm_add(node, 16u)));
        if top + 2u > 64u {
            overflow = 1u;
            break;
        }
        stack[top] = hmm_load_ptr(hmm_add(node, 8u));
        stack[top + 1u] = hmm_load_ptr(node);
        top = top + 2u;
    }
    let out = hmm_arg_ptr(1u);
    hmm_store_u64(out, sum);
    hmm_store_u32(hmm_add(out, 8u), overflow);
}
"#,
    cpu: |lane, _| {
        let (root, out) = (lane.args()[0], lane.args()[1]);
        let mut stack = vec![root];
        let mut sum = 0u64;
        while let Some(node) = stack.pop() {
            if node == 0 {
                continue;
            }
            sum = sum.wrapping_add(lane.load_u64(node + 16)?);
            stack.push(lane.load_u64(node + 8)?);
            stack.push(lane.load_u64(node)?);
        }
        lane.store_u64(out, sum)?;
        lane.store_u32(out + 8, 0)
    },
};

fn build_tree(lo: u64, hi: u64) -> Option<Box<Tree>> {
    if lo >= hi {
        return None;
    }
    let mid = lo + (hi - lo) / 2;
    Some(Box::new(Tree {
        left: build_tree(lo, mid),
        right: build_tree(mid + 1, hi),
        value: mid * 3 + 1,
    }))
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    backend: BackendArg,
    /// Nodes in the list and in the tree. One invocation walks each, so on
    /// lavapipe, which allows an invocation 65535 loop iterations, the
    /// tree (two iterations per node) tops out near 32 000 nodes; past
    /// that the launch fails with a typed error instead of a wrong sum.
    #[arg(long, default_value_t = 20_000)]
    nodes: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // One invocation chases pointers, so each round faults in one more
    // page: as many rounds as the nodes span heap pages (they are
    // scattered wherever the allocator had room). Allow that many.
    let cfg = MirrorConfig {
        max_replays: 20_000,
        ..MirrorConfig::default()
    };
    let mirror = open(&args.backend, cfg)?;
    let n = args.nodes;

    // The list, built back to front so the head is the first node.
    let mut head: Option<Box<Node>> = None;
    for v in (0..n).rev() {
        head = Some(Box::new(Node {
            next: head,
            value: v * v + 7,
        }));
    }
    let want_list: u64 = (0..n).map(|v| v * v + 7).fold(0, u64::wrapping_add);
    let head_ptr = head
        .as_deref()
        .map_or(core::ptr::null(), |h| h as *const Node);
    let mut out = vec![0u64; 2];
    let k = mirror.backend().kernel(&LIST_SUM)?;
    let r = mirror.launch(&k, 1, (head_ptr, out.as_mut_ptr()))?;
    println!(
        "list of {n} Box nodes: device sum {} ({} submissions, {} pages mirrored)",
        out[0], r.submissions, r.pages_in
    );
    if out[0] != want_list {
        return Err(format!("list sum: device {} != CPU {want_list}", out[0]).into());
    }

    let tree = build_tree(0, n);
    let want_tree: u64 = (0..n).map(|v| v * 3 + 1).fold(0, u64::wrapping_add);
    let root = tree
        .as_deref()
        .map_or(core::ptr::null(), |t| t as *const Tree);
    let k = mirror.backend().kernel(&TREE_SUM)?;
    let mut out = vec![0u64; 2];
    let r = mirror.launch(&k, 1, (root, out.as_mut_ptr()))?;
    println!(
        "tree of {n} Box nodes: device sum {} ({} submissions, {} pages mirrored)",
        out[0], r.submissions, r.pages_in
    );
    if out[1] != 0 {
        return Err("tree deeper than the kernel's stack".into());
    }
    if out[0] != want_tree {
        return Err(format!("tree sum: device {} != CPU {want_tree}", out[0]).into());
    }
    print_counters(&mirror);
    println!("linked_list: both sums correct");
    // Unlink iteratively: dropping a long Box chain recursively could
    // exhaust the stack.
    while let Some(mut node) = head {
        head = node.next.take();
    }
    drop(tree);
    Ok(())
}
