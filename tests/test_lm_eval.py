"""lm-evaluation-harness: `megaponder lm-eval` (native model class) on trained tiny checkpoints,
the `lm_eval --model hf` route on an export, and the native class against hand computations.

Everything runs in this process after two short trainings (subprocess CLI), so lm_eval and
torch are imported once; the offline tasks come from the demo corpus's validation split."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from conftest_data import demo_corpus_dir
from test_train import train_cli

lm_eval = pytest.importorskip("lm_eval")

from megaponder.cli import main  # noqa: E402
from megaponder.evaluation.harness import ComputeCounter, MegaponderLM, _vertical_activity  # noqa: E402
from megaponder.evaluation.tasks import OFFLINE_TASKS, offline_task_dir  # noqa: E402

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "data.seq_length=64",
        "train.micro_batch_size=2", "train.log_every=1", "train.progress_bar=false",
        "optim.warmup_steps=1", "train.eval_every=0", "train.threads=1", "train.steps=3",
        "model.max_position_embeddings=128"]
LIMIT = "4"


def _train(run_dir, train_prefix, tokenizer, *extra):
    train_cli(TINY + [f"train.run_dir={run_dir}", f"data.path=[{train_prefix}]", f"data.valid_path=[{train_prefix}]",
                      f"data.tokenizer_model={tokenizer}", *extra])
    return str(run_dir)


@pytest.fixture(scope="module")
def demo():
    return demo_corpus_dir()


@pytest.fixture(scope="module")
def hf_tokenized(demo, tmp_path_factory):
    """The demo corpus re-tokenized with a byte-level BPE `tokenizers` json (vocab 512) trained
    here: a checkpoint with an HF tokenizer exports with its tokenizer.json, which the `hf` route
    needs (SentencePiece conversion belongs to the export of every family)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    from megaponder.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("hftok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.loads(line)["text"] for line in open(os.path.join(demo, "validation.jsonl"))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(out / "tokenizer.json")
    tok.save(path)
    # the validation text is the training text here: small, and the model's quality is irrelevant
    preprocess(os.path.join(demo, "validation.jsonl"), ["text"], "HFTokenizer", path, str(out / "valid"),
               append_eod=True, progress=False, out=open(os.devnull, "w"))
    return str(out / "valid_text_document"), path


@pytest.fixture(scope="module")
def hf_tokenizer_run(hf_tokenized, tmp_path_factory):
    """family -> a run trained (once) with the `tokenizers` json, so its export carries it."""
    data, tok = hf_tokenized
    runs = {}

    def get(family):
        if family not in runs:
            runs[family] = _train(tmp_path_factory.mktemp("runs") / family, data, tok,
                                  "model.vocab_size=512", "data.tokenizer_type=HFTokenizer",
                                  f"model.family={family}")
        return runs[family]
    return get


@pytest.fixture(scope="module")
def vanilla_run(hf_tokenizer_run):
    return hf_tokenizer_run("vanilla")


@pytest.fixture(scope="module")
def ada_run(demo, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("runs") / "ada", os.path.join(demo, "train_text_document"),
                  os.path.join(demo, "tokenizer.model"),
                  "model.family=adaponderlm", "ponder.steps=2")


def _lm_eval_cli(capsys, *args):
    code = main(["lm-eval", *args])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out.strip().splitlines()[-1]), out


@pytest.mark.parametrize("run", ["vanilla_run", "ada_run"])
def test_lm_eval_cli_reports_task_metrics_and_compute(run, request, demo, capsys):
    ckpt = request.getfixturevalue(run)
    res, out = _lm_eval_cli(capsys, "--checkpoint", ckpt, "--tasks", ",".join(OFFLINE_TASKS),
                            "--limit", LIMIT, "--batch_size", "4", "--demo_dir", demo,
                            "--bootstrap_iters", "0")
    assert "|megaponder_kjv_cloze|" in out and "acc_norm" in out  # lm-eval's table, then the JSON
    cloze, mc = res["tasks"]["megaponder_kjv_cloze"], res["tasks"]["megaponder_kjv_mc4"]
    assert 0.0 <= cloze["acc,none"] <= 1.0 and cloze["perplexity,none"] > 1.0
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0
    assert res["scored_tokens"] > 0
    if run == "vanilla_run":
        assert res["mean_iters"] == 1.0 and res["flops_ratio"] == pytest.approx(1.0)
    else:
        # 3 passes at most; every executed pass costs a full backbone row plus head/pondering
        # embedding, so the FLOPs ratio is at least the mean number of passes
        assert 1.0 <= res["mean_iters"] <= 3.0
        assert res["flops_ratio"] >= res["mean_iters"] * 0.99


def _instances(pairs):
    from lm_eval.api.instance import Instance
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


PAIRS = [("And God said, Let there be", " light"),
         ("In the beginning God created the heaven and the", " earth"),
         ("The LORD is my shepherd; I shall not", " want. He maketh me to lie down"),
         ("Blessed", " are the meek")]


def test_native_loglikelihood_equals_hand_computation(ada_run):
    lm = MegaponderLM(ada_run, batch_size=1)
    ctx, cont = PAIRS[1]
    (got, greedy), = lm.loglikelihood(_instances([(ctx, cont)]), disable_tqdm=True)
    whole = lm.tok.encode(ctx + cont)
    n = len(whole) - len(lm.tok.encode(ctx))
    logits = lm.model(torch.tensor([whole[:-1]])).logits[0, -n:].double()
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(whole[-n:]).unsqueeze(-1)).sum()
    assert got == pytest.approx(float(want), abs=1e-4)
    assert greedy == bool((logits.argmax(-1) == torch.tensor(whole[-n:])).all())
    # the counter saw exactly the n scored tokens, at the iterations the forward reports
    iters = lm.model(torch.tensor([whole[:-1]]), return_token_stats=True).stats["token_iterations"][0, -n:]
    assert lm.counter.tokens == n and lm.compute_summary()["mean_iters"] == pytest.approx(float(iters.mean()))


def test_batched_scoring_equals_one_by_one(ada_run):
    """Right padding in a batch changes nothing: every family is causal."""
    one = MegaponderLM(ada_run, batch_size=1)
    many = MegaponderLM(ada_run, batch_size=4)
    a = one.loglikelihood(_instances(PAIRS), disable_tqdm=True)
    b = many.loglikelihood(_instances(PAIRS), disable_tqdm=True)
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-4) and gx == gy
    assert one.compute_summary() == pytest.approx(many.compute_summary())


def test_flops_ratio_of_whole_sequences_is_flops_py_ratio(ada_run):
    """Counting every position of a row gives megaponder/models/flops.py's ratio for that row;
    the marginal split (context not charged) is additive over any cut."""
    from megaponder.models.flops import flops_ratio_from_activity

    model = MegaponderLM(ada_run).model
    iters = torch.tensor([3.0, 1.0, 2.0, 3.0, 1.0, 1.0, 2.0])
    whole = ComputeCounter(model)
    whole.add(iters, 0)
    act = _vertical_activity(iters, 3).double()
    assert whole.summary()["flops_ratio"] == pytest.approx(flops_ratio_from_activity(model, act, 7), rel=1e-12)
    assert whole.summary()["mean_iters"] == pytest.approx(13 / 7)
    cut = ComputeCounter(model)
    cut.add(iters[:4], 0)
    cut.add(iters, 4)  # positions 4..6 after a cached prefix of 4
    assert cut.flops == pytest.approx(whole.flops, rel=1e-12)
    assert cut.vanilla_flops == pytest.approx(whole.vanilla_flops, rel=1e-12)


def test_loglikelihood_rolling_and_generate_until(ada_run):
    from lm_eval.api.instance import Instance

    lm = MegaponderLM(ada_run, max_length=8)
    text = "In the beginning God created the heaven and the earth. And the earth was without form"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = lm.tok.encode(text)
    assert len(ids) > 16  # three windows
    assert lm.counter.tokens == len(ids)  # every token predicted once, the first from EOD
    ref = 0.0
    with torch.no_grad():  # lm-eval's own windows, each scored by hand from the logits
        for ctx, tgt in map(make_disjoint_window, get_rolling_token_windows(ids, lm.tok.eod, 8, 1)):
            inp = (list(ctx) + list(tgt))[:-1]
            lp = torch.log_softmax(lm.model(torch.tensor([inp])).logits[0].double(), -1)[-len(tgt):]
            ref += float(lp.gather(-1, torch.tensor(tgt).unsqueeze(-1)).sum())
    assert rolling == pytest.approx(ref, abs=1e-3)
    req = Instance("generate_until", {}, ("And God said", {"until": ["\n"], "max_gen_toks": 5}), 0)
    (gen,) = lm.generate_until([req])
    from megaponder.infer import generate
    new = generate(lm.model, lm.tok.encode("And God said"), 5, 0.0, 0, vocab_size=lm.tok.vocab_size,
                   eos_id=lm.tok.eod)
    assert gen == lm.tok.decode(new).split("\n")[0]


@pytest.mark.parametrize("family", ["vanilla", "adaponderlm"])  # plain GPTNeoX / trust_remote_code export
def test_hf_route_gives_the_native_loglikelihoods(family, hf_tokenizer_run, demo, tmp_path):
    """tools/convert_checkpoint.py --to hf, then lm-eval's own `hf` model (what
    `lm_eval --model hf --model_args pretrained=DIR` builds) on the offline tasks: the same
    per-request log-likelihoods as the native class on the checkpoint."""
    pytest.importorskip("accelerate")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    run = hf_tokenizer_run(family)
    hf_dir = tmp_path / "hf"
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"), "--from",
                    "megaponder", "--to", "hf", "--input", run, "--output", str(hf_dir)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    tasks = list(OFFLINE_TASKS)

    def per_request(model, model_args=None):
        with offline_task_dir(demo) as tasks_dir:
            res = simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=4, log_samples=True,
                                  bootstrap_iters=0, task_manager=TaskManager(include_path=tasks_dir,
                                                                              include_defaults=False))
        return res, {(t, s["doc_id"], i): r[0][0] for t in tasks for s in res["samples"][t]
                     for i, r in enumerate(s["resps"])}

    remote = ",trust_remote_code=True" if family != "vanilla" else ""
    hf_res, hf_ll = per_request("hf", f"pretrained={hf_dir},dtype=float32,device=cpu{remote}")
    nat_res, nat_ll = per_request(MegaponderLM(run))
    assert hf_ll.keys() == nat_ll.keys() and len(hf_ll) == 4 + 16
    for key in hf_ll:
        assert hf_ll[key] == pytest.approx(nat_ll[key], abs=1e-3), key
    for t in tasks:
        assert hf_res["results"][t]["acc,none"] == nat_res["results"][t]["acc,none"]


def test_unknown_task_is_one_clear_line(ada_run, capsys):
    with pytest.raises(SystemExit) as err:
        main(["lm-eval", "--checkpoint", ada_run, "--tasks", "megaponder_kjv_cloze,no_such_task_xyz",
              "--demo_dir", demo_corpus_dir()])
    msg = str(err.value)
    assert "\n" not in msg and "no_such_task_xyz" in msg and "megaponder_kjv_cloze" in msg
    assert "megaponder_kjv_cloze," not in msg.split("unknown task(s)")[1].split(":")[0]


def test_counted_iterations_are_what_the_cached_decoder_executes(ada_run):
    """mean_iters/flops_ratio come from the forward's token_iterations; with halting switched
    on (a gate threshold that splits the tokens) they match the KV-cached decoder's activity."""
    from megaponder.models.decoders import decode_logits

    lm = MegaponderLM(ada_run)
    ids = torch.tensor([lm.tok.encode(PAIRS[1][0] + PAIRS[1][1] + " " + PAIRS[0][0])])
    for tau in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8, 0.1, 0.9):
        lm.model.ponder_cfg.tau = tau
        iters = lm.model(ids, return_token_stats=True).stats["token_iterations"][0]
        if 1 < len(set(iters.tolist())):
            break
    else:
        pytest.fail("no gate threshold halts some tokens and not others")
    _, (row,) = decode_logits(lm.model, ids, chunk=3, return_decoders=True)
    assert torch.equal(_vertical_activity(iters, lm.model.num_passes), row.executed().bool())


def test_missing_eval_extra_is_one_clear_line(monkeypatch, ada_run):
    monkeypatch.setitem(sys.modules, "megaponder.evaluation.harness", None)  # as if lm_eval were absent
    with pytest.raises(SystemExit) as err:
        main(["lm-eval", "--checkpoint", ada_run, "--tasks", "megaponder_kjv_cloze"])
    assert "pip install 'megaponder[eval]'" in str(err.value) and "\n" not in str(err.value)


def test_latent_family_batched_scoring_and_counts(demo, tmp_path):
    """PonderLM-3 (latent, router-pruned steps): batched == one by one, and the counter's
    whole-row ratio is flops.py's for the executed steps. A freshly initialised checkpoint in
    the saved format is enough here (what is tested is the scoring, not the model's quality)."""
    from megaponder.config import Config, ModelConfig
    from megaponder.models import build_model
    from megaponder.models.flops import flops_ratio_from_activity
    from megaponder.train.checkpoint import write_model_files

    cfg = Config(model=ModelConfig(family="ponderlm3", vocab_size=8192, hidden_size=32, num_layers=2,
                                   num_heads=2, max_position_embeddings=128))
    cfg.ponder.steps = 2
    torch.manual_seed(0)
    write_model_files(str(tmp_path), cfg, build_model(cfg).state_dict(), {"step": 0, "family": "ponderlm3"},
                      os.path.join(demo, "tokenizer.model"))
    one, many = MegaponderLM(str(tmp_path), batch_size=1), MegaponderLM(str(tmp_path), batch_size=4)
    a = one.loglikelihood(_instances(PAIRS), disable_tqdm=True)
    b = many.loglikelihood(_instances(PAIRS), disable_tqdm=True)
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-4) and gx == gy
    s = many.compute_summary()
    assert s == pytest.approx(one.compute_summary()) and 1.0 <= s["mean_iters"] <= 3.0
    steps = torch.tensor([3.0, 1.0, 2.0, 2.0, 1.0])
    whole = ComputeCounter(one.model)
    whole.add(steps, 0)
    assert whole.summary()["flops_ratio"] == pytest.approx(flops_ratio_from_activity(one.model, steps, 5), rel=1e-12)
