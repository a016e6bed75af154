"""Text tasks as (prompt, answer, candidates) examples, scored by the candidates' log-likelihood.

fine-foods: real Amazon fine-food reviews (R package modeldata, Debian r-cran-modeldata), "is this
review great?" -> yes / no. BoolQ, PIQA and the commonsense instruction format (LLM-Adapters'
commonsense_170k: instruction, input, output, answer) are read from their public JSON/JSONL files."""
import bz2
import gzip
import json
import lzma
import os
import struct
import zlib

MODELDATA_DIRS = ["/usr/lib/R/site-library/modeldata/data",
                  os.path.join(os.path.expanduser("~"), ".cache", "structlora", "modeldata", "usr", "lib", "R",
                               "site-library", "modeldata", "data")]
FETCH_MODELDATA = ("cd /tmp && apt-get download r-cran-modeldata && dpkg-deb -x r-cran-modeldata_*.deb "
                   "~/.cache/structlora/modeldata   (and pip install rdata)")


def read_r_lazyload(folder, name):
    """One object of an R package's lazy-load database (data/Rdata.rdx + .rdb), via `rdata`."""
    try:
        import rdata
    except ImportError:
        raise ImportError("reading R data needs `pip install rdata`") from None
    with gzip.open(os.path.join(folder, "Rdata.rdx")) as f:
        index = rdata.conversion.convert(rdata.parser.parse_data(f.read()))
    offset, length = (int(v) for v in index["variables"][name])
    with open(os.path.join(folder, "Rdata.rdb"), "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    kind, body = raw[4:5], raw[5:]  # 4-byte length, then the compression type
    if kind == b"Z":
        data = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    elif kind == b"2":
        data = bz2.decompress(body)
    elif kind == b"1":
        data = zlib.decompress(body)
    else:
        data = zlib.decompress(raw[4:])
    assert len(data) == struct.unpack(">I", raw[:4])[0]
    return rdata.conversion.convert(rdata.parser.parse_data(data))


def fine_foods_example(review, score):
    prompt = f"Review: {' '.join(review.split())}\nIs this a great review? Answer yes or no."
    return {"prompt": prompt, "answer": "yes" if score == "great" else "no", "candidates": ["yes", "no"]}


def load_fine_foods(data_dir=None):
    """(train, test): 4 000 and 1 000 reviews of modeldata's small_fine_foods."""
    folders = ([data_dir] if data_dir else []) + MODELDATA_DIRS
    folder = next((d for d in folders if os.path.isfile(os.path.join(d, "Rdata.rdx"))), None)
    if folder is None:
        raise FileNotFoundError(f"modeldata's small_fine_foods not found in {folders}. Get it with: {FETCH_MODELDATA}")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the index has no RDS header
        return tuple([fine_foods_example(r, str(s)) for r, s in zip(df["review"], df["score"])]
                     for df in (read_r_lazyload(folder, "training_data"), read_r_lazyload(folder, "testing_data")))


def read_json_records(path):
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"no data file at {path!r} (pass --train-file / --eval-file)")
    with open(path) as f:
        text = f.read().strip()
    return json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]


def boolq_example(r):
    prompt = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer true or false."
    return {"prompt": prompt, "answer": "true" if r["answer"] else "false", "candidates": ["true", "false"]}


def piqa_example(r):
    prompt = (f"Please choose the correct solution to the question: {r['goal']}\n"
              f"Solution1: {r['sol1']}\nSolution2: {r['sol2']}\nAnswer format: solution1/solution2")
    return {"prompt": prompt, "answer": f"solution{int(r['label']) + 1}", "candidates": ["solution1", "solution2"]}


def commonsense_examples(records):
    """LLM-Adapters format; the candidates are the distinct answers of the file (e.g. answer1..answer5)."""
    candidates = sorted({r["answer"] for r in records})
    if len(candidates) > 10:
        raise ValueError(f"{len(candidates)} distinct answers: not a multiple-choice file")
    return [{"prompt": r["instruction"] + (f"\n{r['input']}" if r.get("input") else ""), "answer": r["answer"],
             "candidates": candidates} for r in records]


def load_text_task(name, data_dir=None, train_file=None, eval_file=None):
    if name == "fine-foods":
        return load_fine_foods(data_dir)
    records = [read_json_records(train_file), read_json_records(eval_file)]
    if name == "boolq":
        return tuple([boolq_example(r) for r in rs] for rs in records)
    if name == "piqa":
        return tuple([piqa_example(r) for r in rs] for rs in records)
    if name == "commonsense":
        return tuple(commonsense_examples(rs) for rs in records)
    raise ValueError(f"unknown task {name!r}")
