"""CTranslate2 in a process of its own, driven line by line by benchmarks/decode.py.

Why its own process: in a process that has imported torch, CTranslate2's OpenMP calls bind to torch's
libgomp (torch loads it into the global symbol namespace; `LD_DEBUG=bindings` shows `GOMP_parallel` of
libctranslate2 bound to torch/lib/libgomp.so.1). That one runtime then manages CTranslate2's thread team
as well as torch's, counts more threads than cores, and stops spinning between parallel regions, so every
small torch operator afterwards pays a thread wake-up (a 128 x 256 layer norm on 2 cores: 12.6 us before
the first CTranslate2 call, 60 us after). Measured in one process, CTranslate2 would slow down the torch
systems timed after it; run here, each system has the OpenMP runtime a user of it alone would have.

Protocol: the arguments name a JSON file with the settings and the sources (lists of token strings per
batch); the worker loads the model, prints "ready", then for every "run" line on stdin translates all
batches and prints one JSON list: the length of every best hypothesis. End of input ends it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    import ctranslate2

    translator = ctranslate2.Translator(
        settings["model_dir"],
        device=settings["device"],
        compute_type=settings["compute_type"],
        intra_threads=settings["intra_threads"],
        inter_threads=1,
    )
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            continue
        lengths = []
        for source in settings["batches"]:
            results = translator.translate_batch(
                source,
                beam_size=settings["beam"],
                max_batch_size=settings["batch"],
                max_decoding_length=settings["length"],
                min_decoding_length=settings["length"],
                length_penalty=1.0,
                num_hypotheses=1,
            )
            lengths += [len(result.hypotheses[0]) for result in results]
        print(json.dumps(lengths), flush=True)


if __name__ == "__main__":
    main()
