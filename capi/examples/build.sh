#!/usr/bin/env bash
# Builds the C examples with the system `cc` against the static library
# libhmm_capi.a and the committed header capi/include/hmm.h.
#
#   capi/examples/build.sh            # release build of hmm-capi
#   PROFILE=debug capi/examples/build.sh
#
# Binaries land in target/capi-examples/. A Rust static library needs the
# system libraries Rust's std and the drivers use; the list below is what
# `cargo rustc -p hmm-capi --lib --crate-type staticlib -- --print
# native-static-libs` prints on Linux/glibc (the Vulkan loader is opened
# at run time with dlopen, so no -lvulkan).
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=${PROFILE:-release}
case "$profile" in
    release) cargo_flags=(--release) ;;
    debug) cargo_flags=() ;;
    *) echo "PROFILE must be release or debug, not $profile" >&2; exit 2 ;;
esac
target_dir=${CARGO_TARGET_DIR:-target}
cargo build -p hmm-capi "${cargo_flags[@]}"

NATIVE_LIBS=(-lpthread -ldl -lm -lrt -lutil -lgcc_s -lc)
out="$target_dir/capi-examples"
mkdir -p "$out"
for src in capi/examples/*.c; do
    name=$(basename "$src" .c)
    ${CC:-cc} -std=c11 -O2 -Wall -Wextra -Werror -Icapi/include "$src" \
        "$target_dir/$profile/libhmm_capi.a" "${NATIVE_LIBS[@]}" -o "$out/$name"
    echo "built $out/$name"
done
