use super::*;
use std::sync::Arc;

const SAMPLE: &str = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7f1c2b400000-7f1c2b428000 r--p 00001000 fd:01 1835041                    /usr/lib/libc.so.6
7f1c2b428000-7f1c2b429000 rw-s 00000000 00:05 77                         /tmp/my file (deleted)
7f1c2b429000-7f1c2b42a000 ---p 00000000 00:00 0 
7f1c2b42a000-7f1c2b42b000 r-xp 00000000 00:00 0                          [vdso]
7f1c2b42b000-7f1c2b42c000 rw-p 00000000 00:00 0                           leading space
7ffd4c2f0000-7ffd4c311000 rw-p 00000000 00:00 0                          [stack]
";

#[test]
fn parses_sample() {
    let maps = parse_maps(SAMPLE.as_bytes()).unwrap();
    assert_eq!(maps.len(), 7);
    assert_eq!(maps[0].kind, MappingKind::Special("[heap]".into()));
    assert!(maps[0].is_private_anonymous());
    match &maps[1].kind {
        MappingKind::File {
            path,
            offset,
            dev,
            inode,
            deleted,
        } => {
            assert_eq!(path.to_str(), Some("/usr/lib/libc.so.6"));
            assert_eq!(
                (*offset, *dev, *inode, *deleted),
                (0x1000, (0xfd, 1), 1835041, false)
            );
        }
        k => panic!("unexpected {k:?}"),
    }
    assert!(maps[1].read && !maps[1].write && !maps[1].shared);
    match &maps[2].kind {
        MappingKind::File { path, deleted, .. } => {
            assert_eq!(path.to_str(), Some("/tmp/my file"));
            assert!(deleted);
        }
        k => panic!("unexpected {k:?}"),
    }
    assert!(maps[2].shared && !maps[2].is_private_anonymous());
    assert_eq!(maps[3].kind, MappingKind::Anonymous);
    assert!(!maps[3].read && !maps[3].write);
    assert!(maps[4].exec);
    match &maps[5].kind {
        MappingKind::File { path, .. } => assert_eq!(path.to_str(), Some(" leading space")),
        k => panic!("unexpected {k:?}"),
    }
}

#[test]
fn special_mappings_are_kept_from_plain_copies() {
    let ok = |line: &str| parse_line(line.as_bytes(), 1).unwrap().plain_copy_ok();
    let pad = |head: &str, name: &str| format!("{head:<72} {name}");
    assert!(ok("1000-2000 rw-p 00000000 00:00 0"));
    for good in [
        "[heap]",
        "[stack]",
        "[stack:42]",
        "[anon:arena]",
        "[anon_shmem:x]",
        "[vdso]",
        "/usr/lib/libc.so.6",
        "/memfd:pool (deleted)",
        "/dev/zero (deleted)",
        "/dev/shm/buf",
        "/SYSV00000000 (deleted)",
    ] {
        assert!(ok(&pad("1000-2000 rw-s 00000000 00:01 7", good)), "{good}");
    }
    for bad in [
        "[vvar]",
        "[vvar_vclock]",
        "[vsyscall]",
        "/dev/mem",
        "/dev/dri/renderD128",
        "anon_inode:[io_uring]",
        "/dmabuf:",
        "/secretmem (deleted)",
    ] {
        assert!(!ok(&pad("1000-2000 rw-s 00000000 00:05 7", bad)), "{bad}");
    }
}

#[test]
fn secret_memory_is_kept_from_plain_copies() {
    // SAFETY: memfd_secret(0) creates a new fd or fails.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, 0) } as i32;
    if fd < 0 {
        // Not offered by this kernel (or disabled): nothing to classify.
        return;
    }
    // SAFETY: sizing and mapping our own new fd.
    let p = unsafe {
        libc::ftruncate(fd, 4096);
        libc::mmap(
            core::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let maps = read_self_maps().unwrap();
    let m = maps
        .iter()
        .find(|m| m.range.contains(VirtAddr(p as u64)))
        .expect("the secret mapping");
    let plain = m.plain_copy_ok();
    // SAFETY: unmapping and closing what we created.
    unsafe {
        libc::munmap(p, 4096);
        libc::close(fd);
    }
    assert!(!plain, "{m:?}");
    let vvar = maps
        .iter()
        .find(|m| m.kind == MappingKind::Special("[vvar]".into()));
    assert!(vvar.is_none_or(|m| !m.plain_copy_ok()));
}

#[test]
fn odd_lines_are_typed_errors() {
    for bad in [
        "zzzz-1000 rw-p 0 00:00 0",
        "1000 rw-p 0 00:00 0",
        "2000-1000 rw-p 0 00:00 0",
        "1000-2000 rw-q 0 00:00 0",
        "1000-2000 rwp 0 00:00 0",
        "1000-2000 rw-p 0 0000 0",
        "1000-2000 rw-p 0 00:00 x",
        "1000-2000 rw-p",
        "1000-2000 rw-p 0 00:00",
        "\u{0}\u{ff}",
    ] {
        assert!(
            matches!(
                parse_line(bad.as_bytes(), 3),
                Err(MapsError::Parse { line: 3, .. })
            ),
            "{bad:?}"
        );
    }
    assert!(parse_maps(b"1000-2000 rw-p 0 00:00 0\n\xff\xfe\n").is_err());
}

#[test]
fn reads_own_maps() {
    let maps = read_self_maps().unwrap();
    let here = VirtAddr::from_ptr(&maps as *const _);
    assert!(maps
        .iter()
        .any(|m| m.range.contains(here) && m.read && m.write));
}

fn counted(text: Arc<Mutex<String>>) -> MappingCache {
    MappingCache::with_source(move || Ok(lock(&text).clone().into_bytes()))
}

#[test]
fn cache_hits_misses_and_invalidation() {
    let text = Arc::new(Mutex::new(String::from(
        "1000-3000 rw-p 0 00:00 0\n5000-6000 r--p 0 00:00 0\n",
    )));
    let c = counted(text.clone());
    assert!(c.lookup(VirtAddr(0x1000)).unwrap().is_some());
    assert_eq!(c.rereads(), 1);
    assert!(c.lookup(VirtAddr(0x2fff)).unwrap().unwrap().write);
    assert_eq!(c.rereads(), 1, "hit served from cache");
    assert!(c.lookup(VirtAddr(0x4000)).unwrap().is_none());
    assert_eq!(c.rereads(), 2, "miss re-reads");
    // The kernel changed protections; cache still serves old data...
    *lock(&text) = "1000-3000 r--p 0 00:00 0\n5000-6000 r--p 0 00:00 0\n".into();
    assert!(c.lookup(VirtAddr(0x1000)).unwrap().unwrap().write);
    // ...until invalidated.
    let g = c.generation();
    c.invalidate(VaRange::new(VirtAddr(0x2000), VirtAddr(0x2001)).unwrap());
    assert!(c.generation() > g);
    assert!(!c.lookup(VirtAddr(0x1000)).unwrap().unwrap().write);
    assert_eq!(c.rereads(), 3);
    let s = c.stats();
    assert_eq!((s.misses, s.invalidations), (3, 1));
}

#[test]
fn segments_walk_holes() {
    let text = Arc::new(Mutex::new(String::from(
        "1000-3000 rw-p 0 00:00 0\n5000-6000 r--p 0 00:00 0\n",
    )));
    let c = counted(text);
    let segs = c
        .segments(VaRange::new(VirtAddr(0x2000), VirtAddr(0x7000)).unwrap())
        .unwrap();
    let shape: Vec<_> = segs
        .iter()
        .map(|s| (s.range.start().0, s.range.end().0, s.mapping.is_some()))
        .collect();
    assert_eq!(
        shape,
        vec![
            (0x2000, 0x3000, true),
            (0x3000, 0x5000, false),
            (0x5000, 0x6000, true),
            (0x6000, 0x7000, false)
        ]
    );
    assert_eq!(segs[0].mapping.as_ref().unwrap().range, segs[0].range);
}

#[test]
fn remap_moves_knowledge() {
    let text = Arc::new(Mutex::new(String::from("10000-14000 rw-p 0 00:00 0\n")));
    let c = counted(text.clone());
    assert!(c.lookup(VirtAddr(0x10000)).unwrap().is_some());
    // Move the middle two pages to 0x40000.
    *lock(&text) = String::from(
        "10000-11000 rw-p 0 00:00 0\n13000-14000 rw-p 0 00:00 0\n40000-42000 rw-p 0 00:00 0\n",
    );
    c.remap(
        VaRange::new(VirtAddr(0x11000), VirtAddr(0x13000)).unwrap(),
        VirtAddr(0x40000),
    );
    let reads = c.rereads();
    assert!(c.lookup(VirtAddr(0x41fff)).unwrap().is_some());
    assert!(c.lookup(VirtAddr(0x13000)).unwrap().is_some());
    assert!(c.lookup(VirtAddr(0x10000)).unwrap().is_some());
    assert_eq!(c.rereads(), reads, "all answered from moved/kept knowledge");
    assert!(c.lookup(VirtAddr(0x11000)).unwrap().is_none());
    assert_eq!(c.rereads(), reads + 1);
}

#[test]
fn unreadable_source_is_an_error() {
    let c = MappingCache::with_source(|| Err(io::Error::from_raw_os_error(libc::EACCES)));
    assert!(matches!(c.lookup(VirtAddr(0)), Err(MapsError::Read(_))));
}
