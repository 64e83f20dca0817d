//! The CPU builds a linked list and a binary tree of `Box` nodes; the
//! device follows the CPU's own `next`/`left`/`right` pointers and sums the
//! values; the CPU checks both sums. No copying, no registration: the
//! device faults the heap pages it walks into its mirror.
//!
//! `cargo run --release --example linked_list -- [--backend ...] [--nodes N]`

use clap::Parser;
use std::mem::offset_of;

use hmm::{device_struct, DeviceStruct, InOut, MirrorConfig, Ptr};
use hmm_examples::{open, print_counters, BackendArg};

device_struct! {
    /// A list node. Kernels follow it with the generated `Node_get_next(p)`
    /// and `Node_get_value(p)`, whose offsets come from the real layout
    /// (`offset_of!`), not from hand-counted bytes.
    struct Node {
        next: Option<Box<Node>>,
        value: u64,
    }
}

device_struct! {
    /// A tree node: `Tree_get_left(p)`, `Tree_get_right(p)`,
    /// `Tree_get_value(p)`.
    struct Tree {
        left: Option<Box<Tree>>,
        right: Option<Box<Tree>>,
        value: u64,
    }
}

hmm::kernel! {
    const LIST_SUM: list_sum(head: Ptr<Node>, out: InOut<u64>)
        .structs(&[Node::LAYOUT])
        .wgsl(
            r#"
fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn hmm_kernel(i: u32) {
    var node = args.head;
    var sum = vec2<u32>(0u, 0u);
    loop {
        if hmm_is_null(node) || hmm_faulted() {
            break;
        }
        sum = add64(sum, Node_get_value(node));
        node = Node_get_next(node);
    }
    hmm_store_u64(args.out, sum);
}
"#,
        )
        .cpu(|lane, _, (head, out)| {
            let (mut node, mut sum) = (head.addr(), 0u64);
            while node != 0 {
                let v = lane.load_u64(node + offset_of!(Node, value) as u64)?;
                sum = sum.wrapping_add(v);
                node = lane.load_u64(node + offset_of!(Node, next) as u64)?;
            }
            lane.store_u64(out.addr(), sum)
        });
}

hmm::kernel! {
    const TREE_SUM: tree_sum(root: Ptr<Tree>, out: InOut<u64>)
        .structs(&[Tree::LAYOUT])
        .wgsl(
            r#"
fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

// Depth-first with an explicit stack; a deeper tree than the stack holds
// sets word 1 of the output (the CPU reports it) instead of a wrong sum.
fn hmm_kernel(i: u32) {
    var stack: array<vec2<u32>, 64>;
    var top = 1u;
    var sum = vec2<u32>(0u, 0u);
    var overflow = 0u;
    stack[0] = args.root;
    loop {
        if top == 0u || hmm_faulted() {
            break;
        }
        top = top - 1u;
        let node = stack[top];
        if hmm_is_null(node) {
            continue;
        }
        sum = add64(sum, Tree_get_value(node));
        if top + 2u > 64u {
            overflow = 1u;
            break;
        }
        stack[top] = Tree_get_right(node);
        stack[top + 1u] = Tree_get_left(node);
        top = top + 2u;
    }
    hmm_store_u64(args.out, sum);
    hmm_store_u32(hmm_index(args.out, 1u, 8u), overflow);
}
"#,
        )
        .cpu(|lane, _, (root, out)| {
            let mut stack = vec![root.addr()];
            let mut sum = 0u64;
            while let Some(node) = stack.pop() {
                if node == 0 {
                    continue;
                }
                let v = lane.load_u64(node + offset_of!(Tree, value) as u64)?;
                sum = sum.wrapping_add(v);
                stack.push(lane.load_u64(node + offset_of!(Tree, right) as u64)?);
                stack.push(lane.load_u64(node + offset_of!(Tree, left) as u64)?);
            }
            lane.store_u64(out.at(0), sum)?;
            lane.store_u32(out.at(1), 0)
        });
}

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
    let r = mirror.run(&k, 1, (head_ptr, &mut out))?;
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
    let r = mirror.run(&k, 1, (root, &mut out))?;
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
