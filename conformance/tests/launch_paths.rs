//! Every launch of every scenario goes through the suite's launch helper
//! (`support::launch`), so `conformance_tests!`'s non-blocking pass really
//! covers every scenario that launches: no scenario source calls
//! `Mirror::launch` (or a scope) itself, except where a comment says why
//! it must stay blocking.

use std::path::Path;

#[test]
fn scenarios_launch_only_through_the_helper() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    let mut offenders = Vec::new();
    for entry in std::fs::read_dir(&src).expect("conformance/src") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs")
            || path.file_name().and_then(|n| n.to_str()) == Some("support.rs")
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains(".launch(")
                || code.contains(".launch_with(")
                || code.contains(".scope(")
            {
                let excused = lines[i.saturating_sub(3)..i]
                    .iter()
                    .any(|l| l.contains("Blocking on purpose"));
                if !excused {
                    offenders.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                }
            }
            if code.contains("launch(&") {
                checked += 1;
            }
        }
    }
    assert!(
        checked > 20,
        "found only {checked} helper launches: did the sources move?"
    );
    assert!(
        offenders.is_empty(),
        "scenarios launching around `support::launch` (the non-blocking pass would miss them):\n{}",
        offenders.join("\n")
    );
}
