#!/usr/bin/env bash
# Generates the Kotlin, Swift and Python sources of the pingme bindings
# (UniFFI library mode: the interface is read from the built library, no
# UDL). Builds the library and the crate's `uniffi-bindgen` binary in one
# cargo call (feature `cli`), then writes one folder per language:
#   bindings/generate.sh                      # all three into bindings/generated
#   bindings/generate.sh OUT_DIR python       # only Python, into OUT_DIR/python
#   PROFILE=release bindings/generate.sh      # from an optimised library
# The Python folder also gets the library itself (the generated module
# loads it from beside itself), so `PYTHONPATH=OUT_DIR/python python3`
# can `import pingme`. Kotlin and Swift apps package the library their
# own way (bindings/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

out=${1:-bindings/generated}
shift || true
languages=("$@")
[ ${#languages[@]} -gt 0 ] || languages=(python kotlin swift)
profile=${PROFILE:-debug}

flags=(--locked -q -p pingme-bindings --features cli)
[ "$profile" = release ] && flags+=(--release)
cargo build "${flags[@]}"

target="${CARGO_TARGET_DIR:-$root/target}/$profile"
case "$(uname -s)" in
    Darwin) library="$target/libpingme_bindings.dylib" ;;
    *) library="$target/libpingme_bindings.so" ;;
esac

for language in "${languages[@]}"; do
    rm -rf "${out:?}/$language"
    "$target/uniffi-bindgen" generate --language "$language" --out-dir "$out/$language" "$library" > /dev/null
    if [ "$language" = python ]; then
        cp "$library" "$out/python/"
    fi
    echo "$language: $out/$language"
done
