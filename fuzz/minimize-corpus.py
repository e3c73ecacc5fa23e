#!/usr/bin/env python3
"""Shrinks fuzz/corpus/TARGET to the inputs that cover the mtunnel sources, for committing.

    fuzz/minimize-corpus.py TARGET [MORE_INPUT_DIRS...]

`cargo fuzz cmin` keeps every input with a new libFuzzer feature, which is mostly serde_json's
parser and hit counts: thousands of files. This keeps instead
  - every hand-written seed in fuzz/corpus/TARGET (any file not named by a 40-hex hash), and
  - a greedy set cover, over source-based coverage regions of src/ and fuzz/checks.rs, of the
    other inputs: fuzz/corpus/TARGET, fuzz/target/corpus/TARGET (where `make fuzz` puts new
    inputs) and MORE_INPUT_DIRS,
and rewrites fuzz/corpus/TARGET with them. Needs nightly, cargo-fuzz and
`rustup component add llvm-tools --toolchain nightly`.
"""
import hashlib, json, os, re, shutil, subprocess, sys, tempfile
from concurrent.futures import ThreadPoolExecutor

FUZZ = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(FUZZ), "src") + os.sep


def main():
    target, extra = sys.argv[1], sys.argv[2:]
    corpus = os.path.join(FUZZ, "corpus", target)
    host = re.search(r"^host: (\S+)", subprocess.run(["rustc", "+nightly", "-vV"], capture_output=True, text=True, check=True).stdout, re.M).group(1)
    sysroot = subprocess.run(["rustc", "+nightly", "--print", "sysroot"], capture_output=True, text=True, check=True).stdout.strip()
    tools = os.path.join(sysroot, "lib", "rustlib", host, "bin")
    subprocess.run(["cargo", "+nightly", "fuzz", "coverage", target, corpus], cwd=FUZZ, check=True, stdout=subprocess.DEVNULL)
    binary = os.path.join(FUZZ, "target", host, "coverage", host, "release", target)

    inputs = {}  # content hash -> (path, is_seed)
    for d in [corpus, os.path.join(FUZZ, "target", "corpus", target), *extra]:
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            path = os.path.join(d, name)
            data = open(path, "rb").read()
            seed = d == corpus and not re.fullmatch(r"[0-9a-f]{40}", name)
            h = hashlib.sha1(data).hexdigest()
            if h not in inputs or seed:
                inputs[h] = (path, seed)

    tmp = tempfile.mkdtemp()

    def regions(h):
        path = inputs[h][0]
        raw, prof = os.path.join(tmp, h + ".profraw"), os.path.join(tmp, h + ".profdata")
        subprocess.run([binary, path], env=dict(os.environ, LLVM_PROFILE_FILE=raw), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([os.path.join(tools, "llvm-profdata"), "merge", "-sparse", raw, "-o", prof], check=True)
        out = subprocess.run([os.path.join(tools, "llvm-cov"), "export", "-format=text", "-skip-functions", "-instr-profile", prof, binary],
                             capture_output=True, text=True, check=True).stdout
        os.unlink(raw)
        os.unlink(prof)
        covered = set()
        for d in json.loads(out)["data"]:
            for f in d["files"]:
                if f["filename"].startswith(SRC) or f["filename"].endswith("/checks.rs"):
                    covered.update((f["filename"], s[0], s[1]) for s in f["segments"] if s[3] and s[2] > 0 and not s[5])
        return covered

    hashes = sorted(inputs, key=lambda h: (not inputs[h][1], os.path.getsize(inputs[h][0]), h))
    with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        cov = dict(zip(hashes, ex.map(regions, hashes)))
    shutil.rmtree(tmp)
    seeds = [h for h in hashes if inputs[h][1]]
    covered = set().union(*(cov[h] for h in seeds))
    picked = []
    while True:
        rest = [h for h in hashes if not inputs[h][1] and h not in picked]
        best = max(rest, key=lambda h: (len(cov[h] - covered), -os.path.getsize(inputs[h][0])), default=None)
        if best is None or not cov[best] - covered:
            break
        picked.append(best)
        covered |= cov[best]

    keep = {os.path.basename(inputs[h][0]) if inputs[h][1] else h: open(inputs[h][0], "rb").read() for h in seeds + picked}
    shutil.rmtree(corpus)
    os.makedirs(corpus)
    for name, data in keep.items():
        open(os.path.join(corpus, name), "wb").write(data)
    total = set().union(*cov.values())
    print(f"{target}: {len(hashes)} inputs, {len(seeds)} seeds + {len(picked)} picked = {len(keep)} kept, "
          f"covering {len(covered)}/{len(total)} regions of src/ and checks.rs")


if __name__ == "__main__":
    main()
