"""Peak memory and time of the prompt-token checks in ``labels.build_label_set`` (every prompt
fits the text tower, no two labels read alike, the tokenizer is not missing): today's, which
tokenizes a chunk of labels at a time and keeps a 16-byte digest per label
(``labels._check_prompt_tokens``), against the earlier whole-list form (every prompt's token
list at once, each label keyed by a tuple of its prompts' token tuples), side by side, each in
a fresh process so that peak RSS is its own.

    python benchmarks/label_checks.py --labels 21843     # ImageNet-21k x openai-imagenet-80

Needs no model download: the bundled models/shapes-clip (a CLIP BPE tokenizer). The text tower
does not run. Measured 2026-12-05 with this script on the 2-core dev machine, nothing else
running (load 1.3), ``--labels 21843`` (1.75 M prompts): whole 7,691 MB peak RSS growth,
64.7 s; chunked 98 MB, 76.1 s; chunked / whole: memory 0.013, time 1.18. Tokenizing is most of
both; the per-label digests cost ~0.4 s per 400 k prompts, and the chunk size (16 k or 64 k
prompts) does not change the time.

A rerun whose label embeddings are in the cache skips the checks (they passed when the cache was
written): ``cached`` times ``build_label_set`` on such a hit.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(form: str, labels: int) -> dict:
    """Run one form in this process; return its time and peak RSS growth."""
    from zslabel.labels import TEMPLATE_SETS, _check_prompt_tokens
    from zslabel.model import load_model

    model = load_model(ROOT / "models" / "shapes-clip")
    names = [f"class {i} thing" for i in range(labels)]
    templates = list(TEMPLATE_SETS["openai-imagenet-80"])
    prompts = [t.format(n) for n in names for t in templates]
    if form == "cached":  # a rerun: the label embeddings are in the cache (random ones here)
        import os
        import tempfile

        import numpy as np

        from zslabel.labels import _write_cached, build_label_set, label_cache_dir, label_cache_key
        from zslabel.model import checkpoint_digest

        os.environ["ZSLABEL_CACHE"] = tempfile.mkdtemp()
        digest = checkpoint_digest(model.path)
        key = label_cache_key(digest, model, names, templates)
        _write_cached(label_cache_dir() / f"{key}.npy", np.ones((labels, 8), np.float32))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if form == "cached":
        build_label_set(names, templates, model, digest=digest)
    elif form == "chunked":
        _check_prompt_tokens(names, templates, prompts, model)
    else:  # the earlier form, as it was written
        token_ids = model.prompt_token_ids(prompts)
        assert len(set(map(tuple, token_ids))) > 1 and max(map(len, token_ids)) <= model.max_text_length
        per = len(templates)
        groups: dict[tuple, list[str]] = {}
        for i, name in enumerate(names):
            groups.setdefault(tuple(tuple(ids) for ids in token_ids[i * per:(i + 1) * per]), []).append(name)
    return {"form": form, "prompts": len(prompts), "seconds": time.perf_counter() - t,
            "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, default=5000, help="labels, each with the 80 templates (default 5000)")
    p.add_argument("--form", choices=["chunked", "whole", "cached"], help=argparse.SUPPRESS)  # one child's run
    args = p.parse_args()
    if args.form:
        print(json.dumps(measure(args.form, args.labels)))
        return
    got = {}
    for form in ("whole", "chunked", "cached"):
        out = subprocess.run([sys.executable, __file__, "--labels", str(args.labels), "--form", form],
                             capture_output=True, text=True, check=True).stdout
        got[form] = json.loads(out.strip().splitlines()[-1])
        print(f"{form:>8}: {got[form]['prompts']:,} prompts, {got[form]['seconds']:.1f} s, "
              f"peak RSS growth {got[form]['peak_growth_mb']:,.0f} MB", flush=True)
    w, c, r = got["whole"], got["chunked"], got["cached"]
    print(f"chunked / whole: memory {c['peak_growth_mb'] / max(w['peak_growth_mb'], 1):.3f}, "
          f"time {c['seconds'] / w['seconds']:.2f}")
    print(f"a rerun (label embeddings cached: no checks) / chunked checks: time {r['seconds'] / c['seconds']:.4f}")


if __name__ == "__main__":
    main()
