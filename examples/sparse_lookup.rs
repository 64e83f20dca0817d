//! A large hash table in one plain `Vec` on the CPU; the device probes a
//! few thousand keys in it. Only the pages the probes touch are mirrored —
//! the example prints how few, against the table's size — and every answer
//! is checked against the CPU's own lookup.
//!
//! `cargo run --release --example sparse_lookup -- [--backend ...] [--log2-slots 24] [--keys 50000] [--probes 4000]`

use clap::Parser;
use std::mem::offset_of;

use hmm::{device_struct, DeviceStruct, In, InOut, MirrorConfig};
use hmm_examples::{open, print_counters, BackendArg};

device_struct! {
    /// One slot: key 0 means empty. Kernels reach its fields through the
    /// generated `Slot_get_key(p)`, `Slot_get_value(p)` and `Slot_SIZE`.
    #[derive(Clone, Copy, Default)]
    struct Slot {
        key: u64,
        value: u64,
    }
}

/// Returned for a key that is not in the table.
const MISSING: u64 = u64::MAX;

/// The hash both sides use, in 32-bit arithmetic so WGSL computes it the
/// same way.
fn hash(key: u64) -> u32 {
    let (lo, hi) = (key as u32, (key >> 32) as u32);
    let mut h = lo.wrapping_mul(0x9E37_79B1) ^ hi.wrapping_mul(0x85EB_CA77);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^ (h >> 12)
}

hmm::kernel! {
    const PROBE: probe(table: In<Slot>, mask: u32, queries: In<u64>, answers: InOut<u64>)
.structs(&[Slot::LAYOUT])
.wgsl(
    r#"
fn hash(lo: u32, hi: u32) -> u32 {
    var h = (lo * 0x9E3779B1u) ^ (hi * 0x85EBCA77u);
    h = h ^ (h >> 15u);
    h = h * 0x2C1B3C6Du;
    return h ^ (h >> 12u);
}

fn hmm_kernel(i: u32) {
    let key = hmm_load_u64(hmm_index(args.queries, i, 8u));
    var slot = hash(key.x, key.y) & args.mask;
    var answer = vec2<u32>(0xffffffffu, 0xffffffffu);
    for (var n = 0u; n <= args.mask; n++) {
        if hmm_faulted() {
            break;
        }
        let s = hmm_index(args.table, slot, Slot_SIZE);
        let k = Slot_get_key(s);
        if k.x == key.x && k.y == key.y {
            answer = Slot_get_value(s);
            break;
        }
        if k.x == 0u && k.y == 0u {
            break;
        }
        slot = (slot + 1u) & args.mask;
    }
    hmm_store_u64(hmm_index(args.answers, i, 8u), answer);
}
"#,
)
.cpu(|lane, i, (table, mask, queries, answers)| {
    let (key_at, value_at) = (offset_of!(Slot, key) as u64, offset_of!(Slot, value) as u64);
    let key = lane.load_u64(queries.at(i))?;
    let mut slot = hash(key) & mask;
    let mut answer = MISSING;
    for _ in 0..=mask {
        let s = table.at(slot);
        let k = lane.load_u64(s + key_at)?;
        if k == key {
            answer = lane.load_u64(s + value_at)?;
            break;
        }
        if k == 0 {
            break;
        }
        slot = (slot + 1) & mask;
    }
    lane.store_u64(answers.at(i), answer)
});
}

fn lookup(table: &[Slot], key: u64) -> u64 {
    let mask = table.len() as u32 - 1;
    let mut slot = hash(key) & mask;
    loop {
        let s = table[slot as usize];
        if s.key == key {
            return s.value;
        }
        if s.key == 0 {
            return MISSING;
        }
        slot = (slot + 1) & mask;
    }
}

/// splitmix64: a small, good, dependency-free generator.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    backend: BackendArg,
    /// log2 of the table's slots (16 bytes each).
    #[arg(long, default_value_t = 24)]
    log2_slots: u32,
    /// Keys inserted by the CPU.
    #[arg(long, default_value_t = 50_000)]
    keys: usize,
    /// Keys the device looks up (half present, half absent).
    #[arg(long, default_value_t = 4_000)]
    probes: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if !(4..=28).contains(&args.log2_slots) || args.keys >= (1usize << args.log2_slots) / 2 {
        return Err("need 4 <= log2-slots <= 28 and keys < half the slots".into());
    }
    let mirror = open(&args.backend, MirrorConfig::default())?;
    let slots = 1usize << args.log2_slots;
    // A zeroed allocation: the kernel hands out untouched zero pages.
    let mut table = vec![Slot::default(); slots];
    let mask = slots as u32 - 1;
    let mut rng = 0x5eed_u64;
    let mut present = Vec::with_capacity(args.keys);
    for _ in 0..args.keys {
        let key = splitmix(&mut rng) | 1;
        let mut s = hash(key) & mask;
        while table[s as usize].key != 0 && table[s as usize].key != key {
            s = (s + 1) & mask;
        }
        table[s as usize] = Slot {
            key,
            value: key.rotate_left(17) ^ 0xabcd,
        };
        present.push(key);
    }
    let queries: Vec<u64> = (0..args.probes)
        .map(|i| {
            if i % 2 == 0 {
                present[(splitmix(&mut rng) % present.len() as u64) as usize]
            } else {
                splitmix(&mut rng) | 1 // almost surely absent
            }
        })
        .collect();
    let mut answers = vec![0u64; args.probes];

    let k = mirror.backend().kernel(&PROBE)?;
    let t = std::time::Instant::now();
    mirror.run(
        &k,
        args.probes as u32,
        (&table, mask, &queries, &mut answers),
    )?;
    let ms = t.elapsed().as_secs_f64() * 1e3;

    let wrong = queries
        .iter()
        .zip(&answers)
        .filter(|(q, a)| lookup(&table, **q) != **a)
        .count();
    let found = answers.iter().filter(|a| **a != MISSING).count();
    let st = mirror.stats();
    let table_pages = (slots * 16).div_ceil(4096);
    println!(
        "{} probes ({found} found) in {ms:.2} ms; mirrored {} pages ({:.1} MiB) in all, against the table's {table_pages} pages ({} MiB): {:.2}%",
        args.probes,
        st.pages_in,
        st.pages_in as f64 * 4096.0 / (1 << 20) as f64,
        (slots * 16) >> 20,
        100.0 * st.pages_in as f64 / table_pages as f64
    );
    print_counters(&mirror);
    if wrong != 0 {
        return Err(format!("sparse_lookup: {wrong} of {} answers wrong", args.probes).into());
    }
    println!("sparse_lookup: all {} answers correct", args.probes);
    Ok(())
}
