"""Hugging Face export of every family (tools/convert_checkpoint.py --from megaponder --to hf).

Per family a tiny random model (examples/configs/tiny-<family>.yml at d=32, its gates/router/
pause embedding perturbed so that halting and pruning decisions differ between tokens) is
saved as a megaponder checkpoint and exported. One subprocess then loads every export with
``AutoModelForCausalLM`` in isolated mode (``python -I`` from a temp cwd, the editable
install's finder removed from ``sys.meta_path``; it asserts megaponder cannot be imported)
and records logits, generations, iterations and tokenizations that the tests compare with
megaponder's own model, decoder and SentencePiece here.

Each family is compared at megaponder's default evaluation settings (PonderLM-2/3 exact Jacobi,
PonderLM-3 hard pruning, eval stream 0) and, where a setting changes the math, once more with it
switched (VARIANTS).

Tolerance 1e-5 for logits (fp32): the export's code is byte copies of megaponder/models/ (plus
two generated entry points), so it runs the same torch ops in the same order; observed
difference 0. Tokens must be equal (greedy, and sampling with
the same seed).
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO_ROOT, convert_tool
from conftest_data import demo_corpus_dir, neox_tokenizer_json

pytest.importorskip("transformers")

from megaponder.config import FAMILIES, load_config  # noqa: E402
from megaponder.infer import generate  # noqa: E402
from megaponder.models import build_model  # noqa: E402
from megaponder.models.decoders import make_decoder  # noqa: E402
from megaponder.train.checkpoint import write_model_files  # noqa: E402

REMOTE = [f for f in FAMILIES if f != "vanilla"]
MODELS = os.path.join(REPO_ROOT, "megaponder", "models")
ENTRY_POINTS = ("configuration_megaponder.py", "modeling_megaponder.py")   # generated glue
PROMPTS = [[1054, 262, 2093, 311, 45], [77, 5]]  # two lengths: the batch needs left padding
NEW = 5
# families whose depth differs between tokens: their iterations are checked against the decoder
VARIABLE_DEPTH = ("adaponderlm", "ponderlm3", "fixed_pruning", "random_halting")
# the generate() options below the decoder (sampling, return_dict, stopping_criteria, refusals)
# share one code path for every family: checked on one vertical, one latent, one planned family
API_FAMILIES = ("adaponderlm", "ponderlm3", "random_halting")
SHAPE = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=2"]
# thresholds at which the perturbed random gates/routers make token-dependent decisions
TAU = {"adaponderlm": "ponder.tau=0.5", "ponderlm3": "ponder.tau=0.3"}
# non-default evaluation settings, set on the loaded model on both sides: the remote code must
# follow each switch as megaponder does (the default settings are what every family's main
# comparison uses); "stream" is set_eval_stream's evaluation batch
VARIANTS = {"ponderlm2": {"eval_mode": "official", "eval_jacobi_passes": 1},
            "ponderlm3": {"eval_hard_prune": False},
            "fixed_pruning": {"stream": 3}, "random_halting": {"stream": 3}}


_tool = convert_tool


# the llama backbone's exports (name "<family>-llama"): vanilla as the plain LlamaForCausalLM,
# the pondering families through the exported model core's llama backbone (GQA: 1 kv head for 2)
LLAMA_CASES = ["vanilla-llama", "adaponderlm-llama", "ponderlm3-llama"]
LLAMA_SHAPE = ["model.backbone=llama", "model.rotary_pct=1.0", "model.parallel_residual=false",
               "model.num_kv_heads=1", "model.intermediate_size=72"]


def _tiny(case, tokenizer):
    family, _, backbone = case.partition("-")
    name = "tiny.yml" if family == "vanilla" else f"tiny-{family}.yml"
    overrides = SHAPE + [f"data.tokenizer_model={tokenizer}"] + ([TAU[family]] if family in TAU else [])
    overrides += LLAMA_SHAPE if backbone == "llama" else []
    cfg = load_config(os.path.join(REPO_ROOT, "examples", "configs", name), overrides, check_paths=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in model.extra_parameter_names():
                p.add_(0.3 * torch.randn_like(p))
    return cfg, model


def _variant_logits(model, ids, variant):
    """Logits of ``model`` under ``variant`` (ponder settings and/or eval stream), restored after."""
    saved = {k: getattr(model.ponder_cfg, k) for k in variant if k != "stream"}
    for k, v in variant.items():
        if k != "stream":
            setattr(model.ponder_cfg, k, v)
    model.set_eval_stream(variant.get("stream", 0))
    try:
        return model(ids).logits
    finally:
        for k, v in saved.items():
            setattr(model.ponder_cfg, k, v)
        model.set_eval_stream(0)


def _new_token_iterations(model, prompt, new):
    """Iterations megaponder's decoder executed for the position that produced each new token."""
    dec = make_decoder(model, 0)
    dec.feed(torch.tensor([prompt]))
    for tok in new[:-1]:
        dec.feed(torch.tensor([[tok]]))
    executed = dec.executed()
    per_pos = executed.sum(0)[0] if executed.dim() == 3 else executed
    return [float(x) for x in per_pos[len(prompt) - 1:].tolist()]


CHECKER = textwrap.dedent(r'''
    import importlib.util, json, sys
    # the editable install's finder would still find megaponder: drop it, then make sure
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    assert importlib.util.find_spec("megaponder") is None, "megaponder is importable"
    import torch
    torch.set_num_threads(1)   # tiny tensors: threads only add overhead on a shared CPU
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria

    root, families = sys.argv[1], sys.argv[2].split(",")
    results = {"megaponder_importable": importlib.util.find_spec("megaponder") is not None}

    class StopAfter(StoppingCriteria):   # stateful per batch, as lm-eval's stop-sequence one
        def __init__(self, start, n):
            self.start, self.n = start, n
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.start >= self.n)

    for fam in families:
        d = f"{root}/hf-{fam}"
        ref = torch.load(f"{root}/ref-{fam}.pt")
        r = {}
        vanilla = fam.split("-")[0] == "vanilla"
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=not vanilla)
        r["class"], r["training"] = type(model).__name__, model.training
        r["logit_diff"] = (model(ref["ids"]).logits - ref["logits"]).abs().max().item()
        if "variant" in ref:   # the same switches as _variant_logits, on the remote model
            v = ref["variant"]
            for k, val in v.items():
                if k != "stream":
                    setattr(model.ponder_cfg, k, val)
            model.set_eval_stream(v.get("stream", 0))
            r["variant_diff"] = (model(ref["ids"]).logits - ref["variant_logits"]).abs().max().item()
            model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)   # defaults again
        # the plain call (no trust_remote_code) once, as a user would type it
        plain = fam == ref.get("tokenizer_check_family")
        tok = AutoTokenizer.from_pretrained(d) if plain else AutoTokenizer.from_pretrained(d, trust_remote_code=True)
        tok.padding_side = "left"
        prompts = ref["prompts"]
        kw = dict(max_new_tokens=ref["new"], do_sample=False, use_cache=True, output_attentions=False)
        singles, iters = [], []
        for p in prompts:
            out = model.generate(torch.tensor([p]), **kw)
            singles.append(out[0, len(p):].tolist())
            iters.append(getattr(model, "last_generation_iterations", [None])[0])
        r["single"], r["single_iters"] = singles, iters
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                             pad_token_id=tok.pad_token_id, **kw)
        t = batch["input_ids"].shape[1]
        r["batched_prefix_kept"] = bool(torch.equal(out[:, :t], batch["input_ids"]))
        r["batched"] = [row[t:].tolist() for row in out]
        if not vanilla:
            r["batched_iters"] = model.last_generation_iterations
        if fam in ref["api_families"]:
            d2 = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                return_dict_in_generate=True, max_length=t + ref["new"])
            r["dict_sequences_equal"] = bool(torch.equal(d2.sequences, out))
            r["dict_iterations"] = d2.iterations.tolist()
            s = model.generate(torch.tensor([prompts[0]]), do_sample=True, temperature=1.0,
                               top_k=0, max_new_tokens=ref["new"], seed=3)
            r["sampled"] = s[0, len(prompts[0]):].tolist()
            stop = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                  max_new_tokens=ref["new"], stopping_criteria=[StopAfter(t, 2)])
            r["stopped_len"] = stop.shape[1] - t
            eos = singles[0][1]   # row 0 ends at its second token; row 1 at its own first eos
            out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=ref["new"], eos_token_id=eos, pad_token_id=-1)
            r["eos_rows"] = [row[t:].tolist() for row in out]
            r["eos_eos"], r["eos_iters"] = eos, model.last_generation_iterations
            try:
                model.generate(torch.tensor([prompts[0]]), num_beams=2, max_new_tokens=2)
                r["beam_error"] = None
            except ValueError as err:
                r["beam_error"] = str(err)
        if fam == ref.get("tokenizer_check_family"):
            r["encoded"] = [tok(line, add_special_tokens=False)["input_ids"] for line in ref["lines"]]
            r["decoded"] = [tok.decode(ids) for ids in ref["line_ids"][:50]]
            r["eos"], r["pad"] = tok.eos_token_id, tok.pad_token_id
        results[fam] = r
    json.dump(results, open(f"{root}/results.json", "w"))
''')


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export every family, compute megaponder's references, run the isolated checker once."""
    root = tmp_path_factory.mktemp("hfexport")
    demo = demo_corpus_dir()
    spm_path = os.path.join(demo, "tokenizer.model")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_path)
    lines = []
    with open(os.path.join(demo, "validation.jsonl")) as f:
        for row in f:
            lines.extend(json.loads(row)["text"].split("\n"))
    lines = lines[:300] + ["  two  spaces ", "tab\there\nnew line", "a<|endoftext|>b", "",
                           "<|endoftext|>In", "x <unk> y", "émoji 🙂 ☃ 中文 (byte fallback)",
                           " leading space"]
    tool = _tool()
    refs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: threads only add overhead on a shared CPU
    for fam in [*FAMILIES, *LLAMA_CASES]:
        cfg, model = _tiny(fam, spm_path)
        ck = root / f"ck-{fam}"
        write_model_files(str(ck), cfg, model.state_dict(), {"step": 0}, spm_path)
        assert tool.main(["--from", "megaponder", "--to", "hf", "--input", str(ck),
                          "--output", str(root / f"hf-{fam}")]) == 0
        ids = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        eod = sp.piece_to_id("<|endoftext|>")
        greedy = [generate(model, p, NEW, temperature=0.0, vocab_size=cfg.model.vocab_size, eos_id=eod)
                  for p in PROMPTS]
        ref = {"ids": ids, "logits": model(ids).logits, "prompts": PROMPTS, "new": NEW,
               "api_families": API_FAMILIES}
        if fam in VARIANTS:
            ref.update(variant=VARIANTS[fam], variant_logits=_variant_logits(model, ids, VARIANTS[fam]))
            # the variant must change megaponder's logits, or its comparison checks nothing
            assert (ref["variant_logits"] - ref["logits"]).abs().max() > 1e-4, fam
        if fam == "adaponderlm":
            ref.update(tokenizer_check_family=fam, lines=lines,
                       line_ids=[sp.encode(line) for line in lines])
        torch.save(ref, root / f"ref-{fam}.pt")
        refs[fam] = {"cfg": cfg, "model": model, "greedy": greedy, "lines": lines, "sp": sp,
                     "sampled": (generate(model, PROMPTS[0], NEW, temperature=1.0, top_k=0,
                                          vocab_size=cfg.model.vocab_size, eos_id=eod, seed=3)
                                 if fam in API_FAMILIES else None),
                     "iters": ([_new_token_iterations(model, p, g) for p, g in zip(PROMPTS, greedy)]
                               if fam.split("-")[0] in VARIABLE_DEPTH else None)}
    torch.set_num_threads(threads)
    script = root / "check.py"
    script.write_text(CHECKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    cwd = tmp_path_factory.mktemp("isolated-cwd")
    proc = subprocess.run([sys.executable, "-I", str(script), str(root), ",".join([*FAMILIES, *LLAMA_CASES])],
                          cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return root, refs, results


def test_checker_ran_without_megaponder(exported):
    assert exported[2]["megaponder_importable"] is False


@pytest.mark.parametrize("family", FAMILIES)
def test_export_logits_and_greedy_generation(exported, family):
    root, refs, results = exported
    r, ref = results[family], refs[family]
    files = set(os.listdir(root / f"hf-{family}"))
    hf_cfg = json.loads((root / f"hf-{family}" / "config.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    if family == "vanilla":   # plain transformers class, no remote code
        assert r["class"] == "GPTNeoXForCausalLM" and "auto_map" not in hf_cfg
        assert not any(f.endswith(".py") for f in files)
    else:
        assert r["class"] == "MegaponderForCausalLM"
        assert hf_cfg["auto_map"] == {"AutoConfig": "configuration_megaponder.MegaponderConfig",
                                      "AutoModelForCausalLM": "modeling_megaponder.MegaponderForCausalLM"}
        # the model code is megaponder's: byte copies of models/ but the two entry points
        for name in sorted(f for f in files if f.endswith(".py")):
            path = root / f"hf-{family}" / name
            if name in ENTRY_POINTS:
                source = path.read_text()
                assert len(source.splitlines()) <= 150, name
                assert not re.search(r"^\s*(import|from)\s+megaponder\b", source, re.M), name
            else:
                assert path.read_bytes() == open(os.path.join(MODELS, name), "rb").read(), name
        assert {"hf_model.py", "decoders.py", "spec.py"} <= files
    assert r["training"] is False
    assert r["logit_diff"] <= 1e-5, r["logit_diff"]
    if family in VARIANTS:
        assert r["variant_diff"] <= 1e-5, (VARIANTS[family], r["variant_diff"])
    assert r["single"] == ref["greedy"], "one-by-one generate() differs from megaponder's decoder"
    assert r["batched"] == r["single"], "left-padded batched generate() differs from one-by-one"
    assert r["batched_prefix_kept"]


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_backbone_export_logits_and_generation(exported, case):
    """vanilla on llama exports as the plain LlamaForCausalLM; pondering families on llama run
    the exported llama backbone with megaponder's logits, greedy tokens and iterations."""
    root, refs, results = exported
    r, ref = results[case], refs[case]
    hf_cfg = json.loads((root / f"hf-{case}" / "config.json").read_text())
    if case.startswith("vanilla"):
        assert r["class"] == "LlamaForCausalLM" and "auto_map" not in hf_cfg
    else:
        assert r["class"] == "MegaponderForCausalLM"
        assert hf_cfg["backbone"] == "llama" and hf_cfg["num_key_value_heads"] == 1
        assert r["batched_iters"] == r["single_iters"] == ref["iters"]
    assert r["logit_diff"] <= 1e-5, r["logit_diff"]
    assert r["single"] == ref["greedy"] and r["batched"] == r["single"]


@pytest.mark.parametrize("family", REMOTE)
def test_generate_iterations(exported, family):
    _, refs, results = exported
    r, ref = results[family], refs[family]
    # iterations that produced each new token, as megaponder's decoder executed them
    if ref["iters"] is not None:
        assert r["single_iters"] == ref["iters"]
    else:   # fixed depth: K+1 iterations (vertical) / stages (latent) for every token
        m = ref["model"]
        depth = getattr(m, "num_passes", None) or m.num_stages
        assert r["single_iters"] == [[float(depth)] * len(g) for g in ref["greedy"]]
    assert r["batched_iters"] == r["single_iters"]
    flat = [x for row in r["single_iters"] for x in row]
    if family in VARIABLE_DEPTH:
        assert min(flat) < max(flat), f"{family}: every token ran the same depth; the test's " \
                                      f"perturbation no longer exercises halting/pruning"


@pytest.mark.parametrize("family", API_FAMILIES)
def test_generate_sampling_dict_output_stopping_and_refusals(exported, family):
    _, refs, results = exported
    r, ref = results[family], refs[family]
    assert [row[:len(it)] for row, it in zip(r["dict_iterations"], r["batched_iters"])] == r["batched_iters"]
    assert r["dict_sequences_equal"]   # max_length=T+new gives the max_new_tokens result
    assert r["sampled"] == ref["sampled"], "seeded sampling differs from megaponder generate"
    assert r["stopped_len"] == 2, "stopping_criteria not honoured"
    assert r["beam_error"] and "num_beams" in r["beam_error"]
    # eos: kept, then pad_token_id; each row stops on its own
    eos, width = r["eos_eos"], len(r["eos_rows"][0])
    for row, single, iters, got_iters in zip(r["eos_rows"], r["single"], r["single_iters"], r["eos_iters"]):
        n = single.index(eos) + 1 if eos in single else len(single)
        assert row == single[:n] + [-1] * (width - n)
        assert got_iters == iters[:n]


def test_sentencepiece_converted_to_fast_tokenizer(exported):
    _, refs, results = exported
    r, ref = results["adaponderlm"], refs["adaponderlm"]
    sp = ref["sp"]
    expected = [sp.encode(line) for line in ref["lines"]]
    bad = [line for line, a, b in zip(ref["lines"], expected, r["encoded"]) if a != b]
    assert not bad, f"{len(bad)} of {len(expected)} lines encode differently, e.g. {bad[:2]}"
    assert r["decoded"] == [sp.decode(ids) for ids in expected[:50]]
    assert r["eos"] == sp.piece_to_id("<|endoftext|>") and r["pad"] == r["eos"]


@pytest.mark.parametrize("family", ["vanilla", "adaponderlm", "ponderlm3", "fixed_pruning"])
def test_import_back_is_bitwise(exported, family, tmp_path):
    root, refs, _ = exported
    tool = _tool()
    out = tmp_path / "back"
    assert tool.main(["--from", "hf", "--to", "megaponder", "--input", str(root / f"hf-{family}"),
                      "--output", str(out)]) == 0
    state = torch.load(out / "model.pt", weights_only=True)
    original = refs[family]["model"].state_dict()
    assert set(state) == set(original)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    if family != "vanilla":
        from megaponder.train.checkpoint import read_checkpoint_config

        assert read_checkpoint_config(str(out)).to_dict() == refs[family]["cfg"].to_dict()
    if family == "adaponderlm":   # the layout: kept unless given, and --tp 1 resets a tp=2 export
        assert tool.main(["--from", "hf", "--to", "megaponder", "--input", str(root / f"hf-{family}"),
                          "--output", str(tmp_path / "tp2"), "--tp", "2"]) == 0
        assert tool.main(["--from", "megaponder", "--to", "hf", "--input", str(tmp_path / "tp2"),
                          "--output", str(tmp_path / "hf-tp2")]) == 0
        for args, tp in (([], 2), (["--tp", "1"], 1)):
            dst = tmp_path / f"again{len(args)}"
            assert tool.main(["--from", "hf", "--to", "megaponder", "--input", str(tmp_path / "hf-tp2"),
                              "--output", str(dst), *args]) == 0
            assert read_checkpoint_config(str(dst)).parallel.tp == tp


def test_export_of_missing_checkpoint_is_one_line(tmp_path, capsys):
    rc = _tool().main(["--from", "megaponder", "--to", "hf", "--input", str(tmp_path / "nope"),
                       "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nope" in err, err
    assert not (tmp_path / "out").exists()


def test_hf_json_tokenizer_is_copied(exported, tmp_path):
    """A checkpoint whose tokenizer is a ``tokenizers`` json (GPT-NeoX-20B's, as Pythia uses)
    exports that file byte for byte, and AutoTokenizer encodes like megaponder's HFTokenizer."""
    from transformers import AutoTokenizer

    from megaponder.data.tokenizer import HFTokenizer

    root, refs, _ = exported
    tok_json = neox_tokenizer_json()
    cfg, model = refs["vanilla"]["cfg"], refs["vanilla"]["model"]
    ck = tmp_path / "ck"
    write_model_files(str(ck), cfg, model.state_dict(), {"step": 0}, tok_json)
    assert _tool().main(["--from", "megaponder", "--to", "hf", "--input", str(ck),
                         "--output", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == open(tok_json, "rb").read()
    ours, theirs = HFTokenizer(tok_json), AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    lines = refs["vanilla"]["lines"][:100]
    assert [theirs(line, add_special_tokens=False)["input_ids"] for line in lines] == \
        [ours.encode(line) for line in lines]
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.eod
    assert theirs.pad_token_id == ours.pad


def test_cli_generate_decodes_prompt_and_continuation_together(exported, capsys):
    """`megaponder generate` prints decode(prompt + new): decoding the new ids alone dropped the
    space SentencePiece keeps on a word-initial piece ("In the beginning" + "of" printed as
    "In the beginningof")."""
    from megaponder.cli import main

    root, refs, _ = exported
    sp = refs["adaponderlm"]["sp"]
    args = ["generate", "--checkpoint", str(root / "ck-adaponderlm"), "--prompt", "In the beginning",
            "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]
    assert main(args + ["--ids"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert main(args + ["--ids", "--static-cache"]) == 0   # the static-shape decoder: same tokens
    assert json.loads(capsys.readouterr().out) == ids
    assert main(args) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text == sp.decode(ids)
    assert text.startswith("In the beginning")
    new = ids[len(sp.encode("In the beginning")):]
    if sp.id_to_piece(new[0]).startswith("\u2581"):   # word-initial: the space must be there
        assert text[len("In the beginning")] == " "
    # --prompt repeated: one batch (staggered decoding), one JSON line per prompt, in order;
    # greedy, each prompt gets the tokens it gets alone
    assert main([a if a != "In the beginning" else "And God said" for a in args] + ["--ids"]) == 0
    alone = json.loads(capsys.readouterr().out)
    both = ["generate", "--checkpoint", str(root / "ck-adaponderlm"), "--prompt", "In the beginning",
            "--prompt", "And God said", "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]
    assert main(both + ["--ids"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [ids, alone]
    assert main(both) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [text, sp.decode(alone)]
    assert main(both + ["--static-cache"]) == 2   # one line: the static step decodes one prompt
    assert "single --prompt" in capsys.readouterr().err


def test_export_without_tokenizer_still_generates(exported, tmp_path):
    """No tokenizer with the checkpoint: the export has none and no eos; generate() runs to
    max_new_tokens and equals megaponder's decoder."""
    import copy

    from transformers import AutoModelForCausalLM

    _, refs, _ = exported
    cfg, model = copy.deepcopy(refs["adaponderlm"]["cfg"]), refs["adaponderlm"]["model"]
    cfg.data.tokenizer_model = str(tmp_path / "missing.model")
    write_model_files(str(tmp_path / "ck"), cfg, model.state_dict(), {"step": 0})
    assert _tool().main(["--from", "megaponder", "--to", "hf", "--input", str(tmp_path / "ck"),
                         "--output", str(tmp_path / "hf")]) == 0
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    out = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=3)
    assert out[0, len(PROMPTS[0]):].tolist() == generate(model, PROMPTS[0], 3, temperature=0.0,
                                                         vocab_size=cfg.model.vocab_size)


# -- the batched greedy generate(): one staggered decoder against one decoder per row ---------
# Tolerance for scores 1e-5 (fp32): the staggered decoder runs the one-row decoder's
# operations in another association (tests/test_staggered_decode.py); tokens and iterations
# must be equal (the forced gates sit far from tau, so no halting decision can flip).
TOGETHER_CASES = [("vanilla", "neox", {}), ("adaponderlm", "neox", {}),
                  ("adaponderlm", "llama", {"halted_readout": "final"})]
#: the schedule baselines: every row must draw its halting plan as a lone row, as _Row does
SCHEDULE_CASES = [("random_halting", "neox", {"halting_rate": 0.4}),
                  ("fixed_pruning", "llama", {"target_flops_ratio": 2.0, "halted_readout": "final"})]


class _NeverStop:
    """A stopping criterion that never stops: generate() then decodes row by row (the
    reference path, every row at every step in lockstep)."""

    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _hf_tiny(family, backbone, ponder):
    """The in-tree MegaponderForCausalLM of a tiny family (AdaPonderLM's gates forced so that
    tokens halt at different passes), and a left-padded batch of prompts of 3, 9, 5, 2 tokens."""
    from dataclasses import asdict

    from megaponder.models.hf_config import MegaponderConfig
    from megaponder.models.hf_model import MegaponderForCausalLM
    from test_families_helpers import force_ada_gates, real_batch, tiny

    core = tiny(family, backend="sdpa", backbone=backbone, steps=3, **ponder).eval()
    ids, _ = real_batch(4, 16)
    if family == "adaponderlm":
        force_ada_gates(core, ids, frac=0.35)
    hf = MegaponderForCausalLM(MegaponderConfig(
        megaponder_config={"model": asdict(core.cfg), "ponder": asdict(core.ponder_cfg)}))
    hf.load_state_dict(core.state_dict(), strict=True)
    lengths = [3, 9, 5, 2]
    batch = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for r, n in enumerate(lengths):
        batch[r, -n:], mask[r, -n:] = ids[r, :n], 1
    return hf, batch, mask


def _both_paths(hf, batch, mask, monkeypatch, **kw):
    """generate() through one staggered decoder (checked to be taken) and row by row."""
    from megaponder.models import hf_model

    calls = []

    class Counted(hf_model.StaggeredDecoder):
        def decode(self, *args, **kwargs):
            calls.append(self.batch)
            return super().decode(*args, **kwargs)

    monkeypatch.setattr(hf_model, "StaggeredDecoder", Counted)
    kw.update(attention_mask=mask, return_dict_in_generate=True, output_scores=True)
    together = hf.generate(batch, **kw)
    together_iters = hf.last_generation_iterations
    assert calls == [batch.shape[0]], "the greedy batch was not decoded as one staggered batch"
    alone = hf.generate(batch, stopping_criteria=[_NeverStop()], **kw)
    assert len(calls) == 1   # stopping_criteria: the per-row path
    return together, together_iters, alone, hf.last_generation_iterations


def _assert_same(together, together_iters, alone, alone_iters):
    assert torch.equal(together.sequences, alone.sequences)
    assert together_iters == alone_iters
    assert torch.equal(together.iterations, alone.iterations)
    assert len(together.scores) == len(alone.scores)
    for mine, theirs in zip(together.scores, alone.scores):
        assert torch.equal(mine.isinf(), theirs.isinf())   # ended rows and vocabulary padding
        assert (mine - theirs).nan_to_num().abs().max().item() < 1e-5


@pytest.mark.parametrize("family, backbone, ponder", TOGETHER_CASES)
def test_batched_greedy_generate_together_equals_rows_one_by_one(family, backbone, ponder, monkeypatch,
                                                                one_thread):
    """Left-padded prompts of 4 lengths, greedy, no eos: one staggered decoder gives the
    sequences, iterations and scores of one decoder per row; AdaPonderLM's rows really halt
    at different passes (else the staggering is not exercised)."""
    hf, batch, mask = _hf_tiny(family, backbone, ponder)
    together, iters, alone, alone_iters = _both_paths(hf, batch, mask, monkeypatch,
                                                      max_new_tokens=8, eos_token_id=-1)
    _assert_same(together, iters, alone, alone_iters)
    assert together.sequences.shape[1] == batch.shape[1] + 8
    flat = [x for row in iters for x in row]
    if family == "adaponderlm":
        assert min(flat) < max(flat) and len({tuple(row) for row in iters}) == len(iters), iters
    else:
        assert set(flat) == {1.0}


@pytest.mark.parametrize("family, backbone, ponder", TOGETHER_CASES[1:2])
def test_batched_greedy_generate_together_stops_at_eos(family, backbone, ponder, monkeypatch, one_thread):
    """eos (one id, several ids, and one a prompt ends with): a row keeps its eos, then holds
    pad_token_id; the iterations stop with it; the batch ends with its longest row — as row by
    row."""
    hf, batch, mask = _hf_tiny(family, backbone, ponder)
    free = hf.generate(batch, attention_mask=mask, max_new_tokens=8, eos_token_id=-1)
    t = batch.shape[1]
    eos = int(free[1, t + 2])   # row 1 stops at its third token
    for eos_ids in (eos, [eos, int(free[2, t + 5])], [int(batch[0, -1])]):
        together, iters, alone, alone_iters = _both_paths(
            hf, batch, mask, monkeypatch, max_new_tokens=8, eos_token_id=eos_ids, pad_token_id=-7)
        _assert_same(together, iters, alone, alone_iters)
        monkeypatch.undo()
    together, iters, _, _ = _both_paths(hf, batch, mask, monkeypatch, max_new_tokens=8,
                                        eos_token_id=eos, pad_token_id=-7)
    row = together.sequences[1, t:].tolist()
    assert row[:3] == free[1, t:t + 3].tolist() and set(row[3:]) <= {-7}, row
    assert len(iters[1]) == 3


@pytest.mark.parametrize("family, backbone, ponder", SCHEDULE_CASES)
def test_batched_greedy_generate_together_schedule_baselines(family, backbone, ponder, monkeypatch,
                                                             one_thread):
    """fixed_pruning and random_halting, left-padded prompts of 4 lengths: one staggered
    decoder, every row drawing its halting plan as a lone row, gives the sequences,
    iterations and scores of one decoder per row; the rows really halt at different passes."""
    hf, batch, mask = _hf_tiny(family, backbone, ponder)
    together, iters, alone, alone_iters = _both_paths(hf, batch, mask, monkeypatch,
                                                      max_new_tokens=8, eos_token_id=-1)
    _assert_same(together, iters, alone, alone_iters)
    flat = [x for row in iters for x in row]
    assert min(flat) < max(flat) and len({tuple(row) for row in iters}) == len(iters), iters


@pytest.mark.parametrize("family, backbone, ponder", TOGETHER_CASES[1:] + SCHEDULE_CASES[:1])
@pytest.mark.parametrize("one_token", ["one row", "every row"])
def test_batched_greedy_generate_together_takes_one_token_prompts(family, backbone, ponder, one_token,
                                                                  monkeypatch, one_thread):
    """One-token prompts (nothing to prefill before the last token: an empty staggered row)
    in a ragged batch and as the whole batch: one staggered decoder gives the per-row path's
    sequences, iterations and scores, and a one-token row the tokens it gets alone."""
    hf, batch, mask = _hf_tiny(family, backbone, ponder)
    if one_token == "one row":
        mask[3, :-1] = 0
    else:
        batch, mask = batch[:, -1:], mask[:, -1:]
    together, iters, alone, alone_iters = _both_paths(hf, batch, mask, monkeypatch,
                                                      max_new_tokens=8, eos_token_id=-1)
    _assert_same(together, iters, alone, alone_iters)
    lone = hf.generate(batch[3:, -1:], max_new_tokens=8, eos_token_id=-1)
    assert torch.equal(together.sequences[3, -8:], lone[0, -8:])
    if family == "adaponderlm":
        assert len({tuple(row) for row in iters}) > 1, iters


def test_sampling_decodes_row_by_row(monkeypatch, one_thread):
    """Sampling (per-row CPU draws) keeps one decoder per row."""
    from megaponder.models import hf_model

    hf, batch, mask = _hf_tiny("adaponderlm", "neox", {})
    monkeypatch.setattr(hf_model, "StaggeredDecoder", None)   # any use would fail
    out = hf.generate(batch[:3], attention_mask=mask[:3], max_new_tokens=4, do_sample=True,
                      eos_token_id=-1, seed=3)
    for r in range(3):
        n = int(mask[r].sum())
        alone = hf.generate(batch[r:r + 1, -n:], max_new_tokens=4, do_sample=True, eos_token_id=-1, seed=3)
        assert torch.equal(out[r, -4:], alone[0, -4:]), r
