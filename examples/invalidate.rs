//! Memory freed while the device mirrors it: the next device access is a
//! typed fault naming the address, and memory mapped again at the same
//! address is mirrored fresh — the device never sees the old contents.
//!
//! `cargo run --release --example invalidate -- [--backend ...]`

use clap::Parser;
use hmm::{AccessError, InOut, MirrorConfig, MirrorError, Ptr};
use hmm_examples::{open, print_counters, BackendArg};

const PAGES: usize = 16;
const WORDS: usize = PAGES * 1024;

hmm::kernel! {
    /// `dst[i] = src[i]`; `src` is a raw mapping (it is unmapped under the
    /// mirror below), so it is passed as a pointer.
    const COPY: copy_u32(src: Ptr<u32>, dst: InOut<u32>)
        .wgsl(
            r#"
fn hmm_kernel(i: u32) {
    let v = hmm_load_u32(hmm_index(args.src, i, 4u));
    hmm_store_u32(hmm_index(args.dst, i, 4u), v);
}
"#,
        )
        .cpu(|lane, i, (src, dst)| {
            let v = lane.load_u32(src.at(i))?;
            lane.store_u32(dst.at(i), v)
        });
}

/// Maps `PAGES` fresh pages at `at` (or anywhere when null), filled with `fill`.
fn map(at: *mut libc::c_void, fill: u32) -> Result<*mut u32, String> {
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | if at.is_null() {
            0
        } else {
            libc::MAP_FIXED_NOREPLACE
        };
    // SAFETY: an anonymous mapping; with MAP_FIXED_NOREPLACE the kernel
    // refuses (instead of replacing) if anything is mapped at `at`.
    let p = unsafe {
        libc::mmap(
            at,
            PAGES * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED || (!at.is_null() && p != at) {
        return Err(format!(
            "mmap at {at:?} failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let words = p.cast::<u32>();
    for i in 0..WORDS {
        // SAFETY: `i` < WORDS, inside the fresh read-write mapping.
        unsafe { words.add(i).write(fill ^ i as u32) };
    }
    Ok(words)
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    backend: BackendArg,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mirror = open(&args.backend, MirrorConfig::default())?;
    let k = mirror.backend().kernel(&COPY)?;
    let mut out = vec![0u32; WORDS];

    // 1. The device reads the buffer: it is now mirrored.
    //
    // The buffer lives far below where the kernel places mappings nobody
    // asked an address for (top-down from near the stack): once it is
    // unmapped, the hole must stay free for step 3, and another thread of
    // this process (the driver's, the allocator's) mapping something there
    // meanwhile would make "the same address" impossible. 16 TiB up is
    // nowhere near them; try a few spots in case one is taken.
    let buf = (1usize..=8)
        .map(|k| map((k << 44) as *mut libc::c_void, 0x1111_0000))
        .find_map(Result::ok)
        .ok_or("no free spot for the buffer at 16..128 TiB")?;
    mirror.run(&k, WORDS as u32, (buf, &mut out))?;
    if (0..WORDS).any(|i| out[i] != 0x1111_0000 ^ i as u32) {
        return Err("first read: wrong data".into());
    }
    println!("1. device read {PAGES} mirrored pages at {buf:p}");

    // 2. Freed while mirrored: the unmap invalidates the device copy.
    // SAFETY: `buf` is the mapping made above and nothing else uses it.
    if unsafe { libc::munmap(buf.cast(), PAGES * 4096) } != 0 {
        return Err("munmap failed".into());
    }
    match mirror.run(&k, WORDS as u32, (buf, &mut out)) {
        Err(MirrorError::DeviceFault {
            addr,
            write: false,
            reason: AccessError::Unmapped,
        }) => println!("2. after munmap the device read faults: read at {addr}: no CPU mapping"),
        other => return Err(format!("2. expected a typed unmapped fault, got {other:?}").into()),
    }

    // 3. New memory at the same address: mirrored fresh, never stale.
    let again = map(buf.cast(), 0x2222_0000)?;
    mirror.run(&k, WORDS as u32, (again, &mut out))?;
    let stale = (0..WORDS)
        .filter(|&i| out[i] == 0x1111_0000 ^ i as u32)
        .count();
    let fresh = (0..WORDS)
        .filter(|&i| out[i] == 0x2222_0000 ^ i as u32)
        .count();
    println!("3. remapped at the same address: {fresh} fresh words, {stale} stale");
    // SAFETY: the second mapping, no longer used.
    unsafe { libc::munmap(again.cast(), PAGES * 4096) };
    print_counters(&mirror);
    if stale != 0 || fresh != WORDS {
        return Err("the device saw stale data after a remap".into());
    }
    println!("invalidate: freed memory faults, reallocated memory is fresh");
    Ok(())
}
