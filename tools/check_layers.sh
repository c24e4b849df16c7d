#!/usr/bin/env bash
# Fails (exit 1, one line per offending #include) when an include runs against
# the layering in docs/architecture.md, "Layers":
#
#   core -> kernels -> index -> cache     library attention_echo
#        -> store (the L2 store)          (the cache reaches it through l2_store.hpp)
#        -> engine -> serving             library attention_echo_engine
#        -> cli, python
#
# A module includes its own headers, the public headers
# (attention_echo/*.hpp) and the internal headers of the modules listed for it
# below. The engine library sees the core library through its public headers
# only, except core/ (the one ISA dispatcher and the one binary reader are
# shared by both libraries) and, for serving, index/ (the planner finds donor
# prompts with the same vector index the cache uses). The core library and its public headers never
# include the engine's public headers (llama.hpp, serving.hpp, engine.hpp).
# Tests and benchmarks are white-box and not checked.
#
# Usage: tools/check_layers.sh [REPO_ROOT]   (default: this script's repository)
set -euo pipefail

root=${1:-"$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"}
cd "$root"

# Internal modules (src/<module>/) each module may include besides its own.
declare -A allowed=(
  [core]=""
  [kernels]="core"
  [index]="core"
  [store]="core"
  [cache]="core kernels index"
  [engine]="core"
  [serving]="core index engine"
  [cli]=""
  [public]=""
  [python]=""
)
internal_modules="core kernels index store cache engine serving cli"
engine_public="llama.hpp serving.hpp engine.hpp"
# Modules of the core library: they may not include the engine's public headers.
core_library="core kernels index store cache"

contains() {  # contains WORD LIST
  local w
  for w in $2; do [[ $w == "$1" ]] && return 0; done
  return 1
}

module_of() {  # the module a file belongs to, or "" when it is not checked
  case $1 in
    include/attention_echo/*) echo public ;;
    python/src/*) echo python ;;
    src/*/*) local m=${1#src/}; echo "${m%%/*}" ;;
    *) echo "" ;;
  esac
}

violations=0
report() {  # report FILE:LINE MESSAGE
  echo "$1: $2" >&2
  violations=$((violations + 1))
}

include_re='^[[:space:]]*#[[:space:]]*include[[:space:]]*["<]([^">]+)[">]'

while IFS= read -r file; do
  module=$(module_of "$file")
  [[ -n $module ]] || continue
  # The core library: its sources and its public headers.
  in_core_library=false
  if contains "$module" "$core_library" ||
     { [[ $module == public ]] && ! contains "$(basename "$file")" "$engine_public"; }; then
    in_core_library=true
  fi
  while IFS= read -r hit; do
    line=${hit%%:*}
    [[ ${hit#*:} =~ $include_re ]] || continue
    target=${BASH_REMATCH[1]}
    top=${target%%/*}
    if [[ $top == attention_echo ]]; then
      if $in_core_library && contains "${target#attention_echo/}" "$engine_public"; then
        report "$file:$line" "the core library may not include the engine's public header $target"
      fi
    elif contains "$top" "$internal_modules" && [[ $top != "$module" ]] &&
         ! contains "$top" "${allowed[$module]}"; then
      report "$file:$line" "${module/public/the public headers} may not include $target"
    fi
  done < <(grep -nE "$include_re" "$file" || true)
done < <(find include/attention_echo src python/src -type f \( -name '*.hpp' -o -name '*.cpp' -o -name '*.h' \) | sort)

if ((violations > 0)); then
  echo "check_layers: $violations include(s) against the layering; see docs/architecture.md, \"Layers\"" >&2
  exit 1
fi
echo "check_layers: every include follows the layering"
