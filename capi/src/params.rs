//! Declared kernel parameters for the C API: `"x: ptr, y: ptr, a: f32"`
//! parsed into names and kinds, the WGSL prelude that gives the kernel
//! `args.x`, and the launch-time check of each `hmm_arg`'s kind against
//! the declaration (C has no compile-time check to lean on).

use hmm::ParamKind;

use crate::hmm_status_code::HMM_INVALID_ARGUMENT;
use crate::Error;

/// A kernel's declared parameters, in order.
pub(crate) type Declared = Vec<(String, ParamKind)>;

/// The declaration's kind names, as `hmm_arg_kind`s name them.
fn kind_of(name: &str) -> Option<ParamKind> {
    Some(match name {
        "ptr" => ParamKind::Ptr,
        "u32" => ParamKind::U32,
        "i32" => ParamKind::I32,
        "f32" => ParamKind::F32,
        "u64" => ParamKind::U64,
        _ => return None,
    })
}

/// The declaration's name of a kind.
pub(crate) fn kind_name(k: ParamKind) -> &'static str {
    match k {
        ParamKind::Ptr => "ptr",
        ParamKind::U32 => "u32",
        ParamKind::I32 => "i32",
        ParamKind::F32 => "f32",
        ParamKind::U64 => "u64",
        // `ParamKind` is non-exhaustive; every kind is listed above.
        #[allow(unreachable_patterns)]
        _ => "?",
    }
}

/// Parses `"name: kind, …"` (kinds `ptr`, `u32`, `i32`, `f32`, `u64`;
/// blank for none) and builds the WGSL prelude for it.
pub(crate) fn parse(decl: &str) -> Result<(Declared, String), Error> {
    let mut out = Vec::new();
    if !decl.trim().is_empty() {
        for (i, item) in decl.split(',').enumerate() {
            let (name, kind) = item.split_once(':').ok_or_else(|| {
                Error::invalid(format!(
                    "parameter {i} (`{}`) is not `name: kind`",
                    item.trim()
                ))
            })?;
            let (name, kind) = (name.trim(), kind.trim());
            let k = kind_of(kind).ok_or_else(|| {
                Error::invalid(format!(
                    "parameter {i} (`{name}`) has kind `{kind}`; the kinds are ptr, u32, i32, f32, u64"
                ))
            })?;
            if out.iter().any(|(n, _)| n == name) {
                return Err(Error::invalid(format!(
                    "parameter `{name}` is declared twice"
                )));
            }
            out.push((name.to_string(), k));
        }
    }
    if out.len() > hmm::kernel::MAX_PARAMS {
        return Err(Error::invalid(format!(
            "{} parameters; at most {} fit",
            out.len(),
            hmm::kernel::MAX_PARAMS
        )));
    }
    let pairs: Vec<(&str, ParamKind)> = out.iter().map(|(n, k)| (n.as_str(), *k)).collect();
    let prelude = hmm::kernel::args_prelude(&pairs).map_err(|name| {
        Error::invalid(format!("parameter name `{name}` is not a WGSL identifier"))
    })?;
    Ok((out, prelude))
}

/// Checks a launch's argument kinds (`hmm_arg_kind` values) against the
/// declaration.
pub(crate) fn check(declared: &Declared, kinds: &[u32]) -> Result<(), Error> {
    if kinds.len() != declared.len() {
        return Err(Error::new(
            HMM_INVALID_ARGUMENT,
            format!(
                "{} arguments for a kernel that declares {}",
                kinds.len(),
                declared.len()
            ),
        ));
    }
    for (i, ((name, want), &got)) in declared.iter().zip(kinds).enumerate() {
        let matches = match want {
            ParamKind::Ptr => got == 0,
            ParamKind::U32 => got == 1,
            ParamKind::I32 => got == 2,
            ParamKind::F32 => got == 3,
            ParamKind::U64 => got == 4,
            #[allow(unreachable_patterns)]
            _ => false,
        };
        if !matches {
            return Err(Error::new(
                HMM_INVALID_ARGUMENT,
                format!(
                    "argument {i} (`{name}`) is {}; the kernel declares {}",
                    arg_kind_name(got),
                    kind_name(*want)
                ),
            ));
        }
    }
    Ok(())
}

/// An `hmm_arg_kind` value's name.
fn arg_kind_name(k: u32) -> String {
    match k {
        0 => "HMM_ARG_PTR".into(),
        1 => "HMM_ARG_U32".into(),
        2 => "HMM_ARG_I32".into(),
        3 => "HMM_ARG_F32".into(),
        4 => "HMM_ARG_U64".into(),
        5 => "HMM_ARG_I64".into(),
        6 => "HMM_ARG_F64".into(),
        k => format!("unknown kind {k}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_parse_or_name_what_is_wrong() {
        let (d, p) = parse(" x: ptr, y:ptr ,a : f32").expect("parses");
        assert_eq!(
            d,
            vec![
                ("x".to_string(), ParamKind::Ptr),
                ("y".to_string(), ParamKind::Ptr),
                ("a".to_string(), ParamKind::F32)
            ]
        );
        assert!(p.contains("a: f32,"), "{p}");
        assert_eq!(parse("").expect("none").0, vec![]);
        for (bad, says) in [
            ("x ptr", "not `name: kind`"),
            ("x: f64", "kinds are"),
            ("x: ptr, x: u32", "twice"),
            ("2x: u32", "WGSL identifier"),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn launches_are_checked_against_the_declaration() {
        let (d, _) = parse("x: ptr, n: u32, a: f32").expect("parses");
        check(&d, &[0, 1, 3]).expect("matches");
        let e = check(&d, &[0, 1, 6]).expect_err("f64 for f32");
        assert!(
            e.message
                .contains("argument 2 (`a`) is HMM_ARG_F64; the kernel declares f32"),
            "{}",
            e.message
        );
        assert!(check(&d, &[0, 1]).is_err());
    }
}
