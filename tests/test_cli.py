"""qlora-ext finetune end to end on the CPU (and a run on the GPU where there is one): a tiny causal LM
saved to disk, a few steps, a checkpoint, an interruption and a resume that ends where an
uninterrupted run ends, the adapter loaded by PEFT, and data errors that name the line."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import qlora_ext
from qlora_ext import _lora_layers as lora_layers, cli, finetune_data, finetune_optim

from helpers import HAS_CUDA, assert_bits_equal, requires_cuda

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORDS = (
    "the a model weight layer adapter quantized four bit train step loss token prompt response answer is of to".split()
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-lm")
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")  # fmt: skip
    fast.save_pretrained(str(path))
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=1, bos_token_id=2, eos_token_id=3)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = []
    for i in range(12):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12)))
        if i % 2:
            lines.append(json.dumps({"text": words}))
        else:
            lines.append(json.dumps({"prompt": words, "response": " ".join(rng.choice(WORDS) for _ in range(4))}))
    path.write_text("\n".join(lines) + "\n")
    return path


def finetune_args(model_dir, data_file, output, *extra, device="cpu", quiet=True) -> list[str]:
    # The CPU unless asked: the CLI would pick the GPU where there is one, and bit-exact resume is
    # tested (and promised) on the CPU. --lora-r, not --r: torchrun reads --r as its own option.
    return ["finetune", "--model", str(model_dir), "--data", str(data_file), "--output", str(output),
            "--lora-r", "4", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4", "--save-steps", "2",
            "--lr", "1e-2", "--device", device, *(["--quiet"] if quiet else []), *extra]  # fmt: skip


def run(model_dir, data_file, output, *extra, device="cpu", quiet=True):
    return cli.main(finetune_args(model_dir, data_file, output, *extra, device=device, quiet=quiet))


def interrupted_after_first_checkpoint(model_dir, data_file, output, monkeypatch, *extra, device="cpu"):
    """run() stopped (KeyboardInterrupt) right after it wrote its first checkpoint."""
    save = cli._save_checkpoint

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cli, "_save_checkpoint", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            run(model_dir, data_file, output, *extra, device=device)


def adapter_tensors(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_finetune_checkpoint_resume_and_peft(model_dir, data_file, tmp_path, monkeypatch):
    assert run(model_dir, data_file, tmp_path / "straight") == 0
    straight = adapter_tensors(tmp_path / "straight")
    start = adapter_tensors(tmp_path / "straight" / "checkpoint-2")
    assert any(not torch.equal(straight[k], start[k]) for k in straight)  # it trained
    assert any(v.abs().sum() > 0 for k, v in straight.items() if "lora_B" in k)

    # The same run, interrupted right after its checkpoint at step 2, then run again: it resumes.
    interrupted_after_first_checkpoint(model_dir, data_file, tmp_path / "resumed", monkeypatch)
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    assert run(model_dir, data_file, tmp_path / "resumed") == 0
    resumed = adapter_tensors(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight)
    for k in straight:
        assert_bits_equal(resumed[k], straight[k], k)

    # PEFT loads the adapter onto the base (as quantized) and computes what ours computes.
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    lora_config = qlora_ext.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear")
    ours = qlora_ext.prepare_model(copy.deepcopy(base), lora_config, compute_dtype=torch.float32, progress=False)
    qlora_ext.load_adapter(ours, tmp_path / "straight", "trained")
    plain = copy.deepcopy(base)
    for name, module in ours.named_modules():
        if lora_layers.is_lora_layer(module):
            with torch.no_grad():
                plain.get_submodule(name).weight.copy_(lora_layers.base_of(module).dequantize().float())
    theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path / "straight")).eval()
    ids = torch.randint(4, 20, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.cuda
def test_finetune_on_cuda_trains_and_resumes(model_dir, data_file, tmp_path, monkeypatch):
    """The CLI on the GPU (bf16, the 4-bit CUDA kernels): it trains, and a resumed run ends near the
    uninterrupted one. Not bit for bit: CUDA attention backward may sum in a varying order. Adam's
    first steps move each weight by about lr = 1e-2 whatever the gradient's size, so where a gradient
    element is near zero the order can flip a step's sign: at worst 2 lr in each of the 4 steps,
    8e-2. Most elements are far from that, so their median difference must stay under 1e-3 (a
    resume that lost the optimizer's state moves them all by about lr)."""
    assert run(model_dir, data_file, tmp_path / "straight", device="cuda") == 0
    straight = adapter_tensors(tmp_path / "straight")
    start = adapter_tensors(tmp_path / "straight" / "checkpoint-2")
    assert any(not torch.equal(straight[k], start[k]) for k in straight)
    assert all(torch.isfinite(v).all() for v in straight.values())
    log = read_log(tmp_path / "straight")  # on the GPU each step's line has the peak memory
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(0 < e["peak_memory_gib"] < 1 for e in log)
    interrupted_after_first_checkpoint(model_dir, data_file, tmp_path / "resumed", monkeypatch, device="cuda")
    assert run(model_dir, data_file, tmp_path / "resumed", device="cuda") == 0
    resumed = adapter_tensors(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight)
    diff = torch.cat([(resumed[k].float() - straight[k].float()).abs().flatten() for k in straight])
    assert diff.max() <= 8e-2 and diff.median() < 1e-3, (diff.max(), diff.median())


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"text": "a b"', "not valid JSON"),
        ('["text"]', "a line must be a JSON object"),
        ('{"prompt": "a"}', "needs 'text', 'prompt' and 'response', 'prompt' and 'completion', or 'messages'"),
        ('{"prompt": "a", "response": "b", "completion": "c"}', "needs 'text', 'prompt' and 'response'"),
        ('{"prompt": "a", "completion": ""}', "'completion' is empty"),
        ('{"messages": []}', "'messages' must be a list"),
        ('{"messages": [{"role": "user"}]}', "messages[0] must be an object with 'role' and 'content'"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "'messages' has no assistant turn"),
        (
            '{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}',
            "'prompt' is a list of messages, so 'completion' must be one too",
        ),
        (
            '{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}',
            "'completion' has no assistant turn",
        ),
        ('{"text": 3}', "'text' must be a string"),
        ('{"prompt": "a", "response": "  "}', "'response' is empty"),
    ],
)
def test_malformed_data_names_the_line(model_dir, tmp_path, capsys, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "the model"}\n\n' + line + "\n")
    assert run(model_dir, data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"bad.jsonl:3: {message}" in err, err


def test_prompts_that_fill_max_length_are_left_out(model_dir, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    long_prompt = " ".join(["the"] * 40)
    data.write_text(json.dumps({"prompt": long_prompt, "response": "answer"}) + "\n"
                    + json.dumps({"text": "the model is quantized"}) + "\n")  # fmt: skip
    assert run(model_dir, data, tmp_path / "out", "--max-length", "16", "--max-steps", "1") == 0
    assert "1 of 2 examples left out" in capsys.readouterr().err
    tensors = adapter_tensors(tmp_path / "out")
    assert all(torch.isfinite(v).all() for v in tensors.values())
    only_long = tmp_path / "only-long.jsonl"
    only_long.write_text(json.dumps({"prompt": long_prompt, "response": "answer"}) + "\n")
    assert run(model_dir, only_long, tmp_path / "out2", "--max-length", "16") == 2
    assert "no example has a token to learn from" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_run(model_dir, data_file, tmp_path, monkeypatch):
    interrupted_after_first_checkpoint(model_dir, data_file, tmp_path / "out", monkeypatch)
    with pytest.raises(SystemExit, match="other r"):
        cli.main(["finetune", "--model", str(model_dir), "--data", str(data_file), "--output", str(tmp_path / "out"),
                  "--r", "8", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4", "--save-steps", "2",
                  "--lr", "1e-2", "--quiet"])  # fmt: skip


def test_patch_transformers_is_on_for_a_new_run_and_a_resumed_run_keeps_its_choice(
    model_dir, data_file, tmp_path, monkeypatch
):
    """--patch-transformers: on by default for a new run (the model's rotary and norms on qlora_ext's
    kernels while it trains, transformers as it was after), recorded in each checkpoint; a resume takes
    the recorded choice, off where a checkpoint predates the option, and refuses the other one."""
    from qlora_ext import transformers_patch

    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    original_rotary = llama.apply_rotary_pos_emb
    seen = []  # what was patched at each checkpoint
    save = cli._save_checkpoint

    def save_and_look(*args, **kwargs):
        seen.append(transformers_patch.patched())
        return save(*args, **kwargs)

    monkeypatch.setattr(cli, "_save_checkpoint", save_and_look)
    interrupted_after_first_checkpoint(model_dir, data_file, tmp_path / "on", monkeypatch)
    assert "transformers.models.llama.modeling_llama.apply_rotary_pos_emb" in seen[-1], seen
    assert "transformers.models.llama.modeling_llama.LlamaRMSNorm.forward" in seen[-1], seen
    assert transformers_patch.patched() == [] and llama.apply_rotary_pos_emb is original_rotary
    assert "transformers.models.llama.modeling_llama.LlamaMLP.forward" in seen[-1], seen
    path = tmp_path / "on" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    assert state["run"]["patch_transformers"] == ["rms_norm", "rotary", "swiglu"]
    with pytest.raises(SystemExit, match="other patch_transformers"):
        run(model_dir, data_file, tmp_path / "on", "--no-patch-transformers")
    # c7b8d13 recorded true, before the MLP's gating was a part: resumed with the norms and rotary only
    state["run"]["patch_transformers"] = True
    path.write_text(json.dumps(state))
    seen.clear()
    assert run(model_dir, data_file, tmp_path / "on") == 0
    assert seen and all(len(s) == 2 and not any("MLP" in name for name in s) for s in seen), seen
    with pytest.raises(SystemExit, match="other patch_transformers"):  # (what --patch-transformers runs now)
        interrupted_after_first_checkpoint(model_dir, data_file, tmp_path / "on2", monkeypatch)
        path2 = tmp_path / "on2" / "checkpoint-2" / "trainer_state.json"
        state2 = json.loads(path2.read_text())
        state2["run"]["patch_transformers"] = True
        path2.write_text(json.dumps(state2))
        run(model_dir, data_file, tmp_path / "on2", "--patch-transformers")

    # A checkpoint written before the option (no key in its run): resumed without the patch, to the
    # bits of a run without it from the start.
    seen.clear()
    assert run(model_dir, data_file, tmp_path / "straight", "--no-patch-transformers") == 0
    assert seen and all(s == [] for s in seen), seen
    interrupted_after_first_checkpoint(model_dir, data_file, tmp_path / "old", monkeypatch, "--no-patch-transformers")
    path = tmp_path / "old" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["run"]["patch_transformers"]
    path.write_text(json.dumps(state))
    seen.clear()
    assert run(model_dir, data_file, tmp_path / "old") == 0
    assert seen and all(s == [] for s in seen), seen
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "old")
    for k in straight:
        assert_bits_equal(resumed[k], straight[k], k)


def test_a_run_patches_as_its_option_says_and_leaves_the_process_as_it_was(model_dir, data_file, tmp_path, monkeypatch):
    """A program that patched transformers itself before calling the CLI: --no-patch-transformers
    trains unpatched (what its checkpoints record is what ran), a default run patches its own
    architecture only, and after each run the program's patches are back exactly."""
    from qlora_ext import transformers_patch

    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    own_rotary = llama.apply_rotary_pos_emb
    seen = []
    save = cli._save_checkpoint
    looking = lambda *a, **k: seen.append(transformers_patch.patched()) or save(*a, **k)  # noqa: E731
    monkeypatch.setattr(cli, "_save_checkpoint", looking)
    host = sorted(transformers_patch.patch_transformers(["qwen2", "llama"], rotary=False))
    host_norm = llama.LlamaRMSNorm.forward
    try:
        assert run(model_dir, data_file, tmp_path / "off", "--no-patch-transformers", "--max-steps", "2") == 0
        assert seen and all(s == [] for s in seen), seen
        assert sorted(transformers_patch.patched()) == host and llama.LlamaRMSNorm.forward is host_norm
        seen.clear()
        assert run(model_dir, data_file, tmp_path / "on", "--max-steps", "2") == 0
        rotary = "transformers.models.llama.modeling_llama.apply_rotary_pos_emb"
        assert seen and all(rotary in s and not any("qwen2" in name for name in s) for s in seen), seen
        assert sorted(transformers_patch.patched()) == host and llama.LlamaRMSNorm.forward is host_norm
        assert llama.apply_rotary_pos_emb is own_rotary
    finally:
        qlora_ext.unpatch_transformers()


def test_no_resume_starts_over_and_moves_the_earlier_run_aside(model_dir, data_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupted_after_first_checkpoint(model_dir, data_file, out, monkeypatch)
    first = adapter_tensors(out / "checkpoint-2")
    (out / "notes.txt").write_text("the user's own file")
    assert run(model_dir, data_file, out, "--no-resume") == 0
    assert f"moved to {out / 'previous-1'}" in capsys.readouterr().err
    # nothing deleted: the earlier checkpoint is whole in previous-1, the user's file untouched
    moved = adapter_tensors(out / "previous-1" / "checkpoint-2")
    for k in first:
        assert_bits_equal(moved[k], first[k], k)
    assert (out / "notes.txt").read_text() == "the user's own file"
    # it started over: the same adapter as a run in an empty directory
    assert run(model_dir, data_file, tmp_path / "fresh") == 0
    fresh, again = adapter_tensors(tmp_path / "fresh"), adapter_tensors(out)
    for k in fresh:
        assert_bits_equal(again[k], fresh[k], k)
    # a second --no-resume takes the next number; on an empty directory it moves nothing
    assert run(model_dir, data_file, out, "--no-resume", "--max-steps", "1") == 0
    assert (out / "previous-2" / "adapter_model.safetensors").exists()
    assert run(model_dir, data_file, tmp_path / "empty", "--no-resume", "--max-steps", "1") == 0
    assert not list((tmp_path / "empty").glob("previous-*"))


def test_a_fresh_run_moves_what_it_would_overwrite_aside(model_dir, data_file, tmp_path, capsys):
    """No checkpoint to resume, but an earlier run's adapter and log (its checkpoints deleted by the
    user) and a checkpoint-N directory of the user's own: moved into previous-1, byte for byte, not
    overwritten. A run that resumes refuses a checkpoint-N directory it did not write (its own
    checkpoint of that step would replace it whole)."""
    out = tmp_path / "out"
    out.mkdir()
    mine = {"adapter_model.safetensors": b"weights", "adapter_config.json": b"{}", "log.jsonl": b"{}\n"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "eval_notes.txt").write_text("mine")
    assert run(model_dir, data_file, out) == 0
    assert f"no checkpoint to resume in {out}: the earlier run's files in {out} moved to {out / 'previous-1'}" in (
        capsys.readouterr().err
    )
    for name, data in mine.items():
        assert (out / "previous-1" / name).read_bytes() == data
    assert (out / "previous-1" / "checkpoint-4" / "eval_notes.txt").read_text() == "mine"
    assert (out / "adapter_model.safetensors").read_bytes() != mine["adapter_model.safetensors"]
    (out / "checkpoint-9").mkdir()  # beside the run's own checkpoints, which it resumes
    with pytest.raises(SystemExit, match="holds checkpoint-9, which are not checkpoints of qlora-ext finetune"):
        run(model_dir, data_file, out, "--max-steps", "10")
    assert (out / "checkpoint-9").is_dir()


def test_help_shows_every_default_and_what_each_option_does(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = cli.build_parser()
    finetune = parser._subparsers._group_actions[0].choices["finetune"]
    for action in finetune._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest  # says what it does
        if not action.required:
            assert f"(default: {action.default})" in text, action.dest
    assert "(default: 64)" in text and "(default: 0.0002)" in text
    assert "moved, not deleted" in text


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-grad-norm", "-1", r"must be in \[0, inf\), got -1"),  # a negative factor reverses the step
        ("--max-grad-norm", "nan", "got nan"),
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--grad-accum", "0", "must be at least 1, got 0"),
        ("--max-steps", "-5", "must be at least 0, got -5"),
        ("--epochs", "0", r"must be in \(0, inf\), got 0"),
        ("--epochs", "-2", "got -2"),
        ("--warmup-ratio", "5", r"must be in \[0, 1\], got 5"),
        ("--save-steps", "-1", "must be at least 0"),
        ("--eval-steps", "-1", "must be at least 0"),
        ("--keep", "-1", "must be at least 0"),
        ("--max-length", "0", "must be at least 1"),
        ("--lora-r", "0", "must be at least 1"),
        ("--lora-dropout", "1", r"must be in \[0, 1\), got 1"),
        ("--lora-alpha", "inf", "got inf"),
        ("--lr", "-0.0001", "got -0.0001"),
        ("--batch-size", "two", "invalid int value: 'two'"),
    ],
)
def test_a_value_out_of_range_is_a_usage_error_naming_the_option(model_dir, data_file, tmp_path, capsys, option,
                                                                  value, message):  # fmt: skip
    with pytest.raises(SystemExit) as e:
        run(model_dir, data_file, tmp_path / "out", option, value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(f"argument [^:]*{option}: .*{message}", err), err
    assert not (tmp_path / "out").exists()  # nothing written


def test_max_grad_norm_0_clips_nothing_and_still_logs_the_norm(model_dir, data_file, tmp_path):
    """0 is transformers' Trainer's "no clipping": clip_grad_norm_ with 0 would zero every gradient, and
    lora_B, which starts at 0, would stay there."""
    out = tmp_path / "out"
    assert run(model_dir, data_file, out, "--max-grad-norm", "0") == 0
    assert all(e["grad_norm"] > 0 for e in read_log(out) if "loss" in e)
    lora_B = [t for name, t in adapter_tensors(out).items() if "lora_B" in name]
    assert lora_B and all(bool(t.abs().gt(0).any()) for t in lora_B)


@pytest.mark.parametrize("content", [None, "", "\n \n"])
def test_missing_or_empty_data_is_a_one_line_error(model_dir, tmp_path, capsys, content):
    data = tmp_path / "train.jsonl"
    if content is not None:
        data.write_text(content)
    assert run(model_dir, data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{data}: " + ("no such file" if content is None else "no examples") in err
    assert not (tmp_path / "out").exists()  # nothing written before the data is read


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "a model"},
    {"role": "user", "content": "the prompt is"},
    {"role": "assistant", "content": "the answer"},
    {"role": "user", "content": "a token"},
    {"role": "assistant", "content": "four bit"},
]


@pytest.fixture(scope="module")
def chat_model_dir(model_dir, tmp_path_factory):
    """The tiny model with a chat template in its tokenizer."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-chat-lm") / "m"
    shutil.copytree(model_dir, path)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return path


def test_chat_messages_take_loss_on_the_assistant_turns_only(chat_model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(chat_model_dir))
    [(ids, labels)] = finetune_data.tokenize([{"messages": CONVERSATION, "where": "x:1"}], tok, 512)
    words = tok.convert_ids_to_tokens(ids)
    # rendered by the template: roles (unknown words) and turns, each closed by </s>
    assert words[:3] == ["<unk>", "<unk>", "a"] and words.count("</s>") == 5
    learned = [tok.convert_ids_to_tokens(t) if t != -100 else None for t in labels]
    # the assistant's words and the </s> that closes each of its turns; not its "assistant :" header
    assert [w for w in learned if w] == ["the", "answer", "</s>", "four", "bit", "</s>"]
    assert all(t in (-100, i) for t, i in zip(labels, ids))
    first = words.index("answer")
    assert learned[first - 1 : first + 2] == ["the", "answer", "</s>"] and learned[first - 3] is None

    # TRL's conversational prompt-completion: the same text, only the completion's assistant turn learned
    [line] = [finetune_data._example(json.dumps({"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:]}), "x:1")]
    [(ids2, labels2)] = finetune_data.tokenize([line], tok, 512)
    assert ids2 == ids
    assert [tok.convert_ids_to_tokens(t) for t in labels2 if t != -100] == ["four", "bit", "</s>"]


def test_data_formats_train(model_dir, chat_model_dir, tmp_path, capsys):
    pairs = [("the model is", "quantized"), ("a layer of", "four bit"), ("the loss", "is a token")]
    response = tmp_path / "response.jsonl"
    response.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    completion = tmp_path / "completion.jsonl"
    completion.write_text("".join(json.dumps({"prompt": p, "completion": r, "id": 7}) + "\n" for p, r in pairs))
    # TRL's {"prompt", "completion"} is {"prompt", "response"} by another name
    assert run(model_dir, response, tmp_path / "response", "--max-steps", "1") == 0
    assert run(model_dir, completion, tmp_path / "completion", "--max-steps", "1") == 0
    a, b = adapter_tensors(tmp_path / "response"), adapter_tensors(tmp_path / "completion")
    for k in a:
        assert_bits_equal(b[k], a[k], k)

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": CONVERSATION[i:]}) + "\n" for i in (0, 1, 3)))
    assert run(chat_model_dir, chat, tmp_path / "chat", "--max-steps", "2", "--save-steps", "1") == 0
    start, end = adapter_tensors(tmp_path / "chat" / "checkpoint-1"), adapter_tensors(tmp_path / "chat")
    assert any(not torch.equal(start[k], end[k]) for k in end)
    assert all(torch.isfinite(v).all() for v in end.values())

    # without a chat template: an error that names the line and what to do
    capsys.readouterr()
    assert run(model_dir, chat, tmp_path / "no-template") == 2
    err = capsys.readouterr().err
    assert f"{chat}:1: a 'messages' line needs a chat template" in err and "chat_template" in err, err


def test_a_finished_run_continues_with_more_steps_on_its_own_schedule(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    # warm-up over half of 4 steps: 2 steps
    assert run(model_dir, data_file, out, "--warmup-ratio", "0.5", "--save-steps", "0") == 0
    assert [p.name for p in cli._checkpoints(out)] == ["checkpoint-4"]  # the last step is checkpointed
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["schedule"] == {"length": 4, "warmup": 2}
    four = adapter_tensors(out)
    for k, v in adapter_tensors(out / "checkpoint-4").items():
        assert_bits_equal(v, four[k], k)

    # the same --max-steps again: nothing to do, nothing changed
    capsys.readouterr()
    assert run(model_dir, data_file, out, "--warmup-ratio", "0.5", "--save-steps", "0") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert [p.name for p in cli._checkpoints(out)] == ["checkpoint-4"]
    for k, v in adapter_tensors(out).items():
        assert_bits_equal(v, four[k], k)

    # stopped between its last checkpoint and writing the adapter: the adapter is written, no step taken
    (out / "adapter_model.safetensors").unlink()
    assert run(model_dir, data_file, out, "--warmup-ratio", "0.5", "--save-steps", "0") == 0
    assert "nothing to do" not in capsys.readouterr().err
    assert [p.name for p in cli._checkpoints(out)] == ["checkpoint-4"] and len(read_log(out)) == 4
    for k, v in adapter_tensors(out).items():
        assert_bits_equal(v, four[k], k)

    # 8 steps: it continues from step 4 with the 2-step warm-up it started with (not 4 = half of 8),
    # so it ends where a straight 8-step run with a 2-step warm-up ends
    assert run(model_dir, data_file, out, "--warmup-ratio", "0.5", "--save-steps", "0", "--max-steps", "8") == 0
    assert [p.name for p in cli._checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["schedule"] == {"length": 4, "warmup": 2} and state["step"] == 8
    straight = tmp_path / "straight"
    assert run(model_dir, data_file, straight, "--warmup-ratio", "0.25", "--save-steps", "0", "--max-steps", "8") == 0
    extended, expected = adapter_tensors(out), adapter_tensors(straight)
    assert any(not torch.equal(extended[k], four[k]) for k in four)
    for k in expected:
        assert_bits_equal(extended[k], expected[k], k)
    other = tmp_path / "other-warmup"
    assert run(model_dir, data_file, other, "--warmup-ratio", "0.5", "--save-steps", "0", "--max-steps", "8") == 0
    assert any(not torch.equal(extended[k], v) for k, v in adapter_tensors(other).items())

    # fewer steps than it has trained: refused, with what to do
    with pytest.raises(SystemExit, match="has trained 8 steps, past the 6 asked for"):
        run(model_dir, data_file, out, "--warmup-ratio", "0.5", "--max-steps", "6")


def read_log(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def test_the_run_leaves_its_log_eval_loss_and_plot(model_dir, data_file, tmp_path):
    pytest.importorskip("matplotlib")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"text": "the model is a quantized layer"}) + "\n"
                         + json.dumps({"prompt": "the loss of", "response": "four bit"}) + "\n")  # fmt: skip
    out = tmp_path / "out"
    assert run(model_dir, data_file, out, "--eval-data", str(eval_file), "--eval-steps", "2") == 0
    log = read_log(out)
    train = [e for e in log if "loss" in e]
    evals = [e for e in log if "eval_loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4] and [e["step"] for e in evals] == [2, 4]
    assert [e["step"] for e in log] == [1, 2, 2, 3, 4, 4]  # each evaluation after its step
    for e in train:
        assert set(e) == {"step", "loss", "learning_rate", "grad_norm", "tokens_per_s"}  # no GPU: no peak memory
        assert 0 < e["loss"] < 10 and e["grad_norm"] > 0 and e["tokens_per_s"] > 0
    # a 1-step warm-up (3% of 4 steps, at least 1): half the rate at the first step, then lr
    assert [e["learning_rate"] for e in train] == [5e-3, 1e-2, 1e-2, 1e-2]

    # the eval loss is the mean cross-entropy of the eval tokens under the final adapter, computed here
    # example by example
    from qlora_ext.cli import load_model

    lora = qlora_ext.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear")
    model = load_model(model_dir, lora, torch.float32, torch.device("cpu"), "nf4", True)
    qlora_ext.delete_adapter(model, "default")
    qlora_ext.load_adapter(model, out, "default")
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in finetune_data.tokenize(finetune_data.read_examples(eval_file), tok, 512):
            logits = model(torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(labels[1:])
            total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    assert evals[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert evals[0]["eval_loss"] != evals[-1]["eval_loss"]

    # the checkpoint's trainer_state.json has the loss and the history up to its step
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["loss"] == train[1]["loss"] and state["log_history"] == log[:3]

    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # evaluating does not change the training (no dropout drawn, no generator advanced)
    assert run(model_dir, data_file, tmp_path / "plain") == 0
    plain, evaluated = adapter_tensors(tmp_path / "plain"), adapter_tensors(out)
    for k in plain:
        assert_bits_equal(evaluated[k], plain[k], k)


def test_a_resumed_run_logs_each_step_once_with_the_uninterrupted_losses(model_dir, data_file, tmp_path, monkeypatch):
    assert run(model_dir, data_file, tmp_path / "straight") == 0
    interrupted_after_first_checkpoint(model_dir, data_file, tmp_path / "resumed", monkeypatch)
    with open(tmp_path / "resumed" / "log.jsonl", "a") as f:  # a step logged after the checkpoint, then lost
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    assert run(model_dir, data_file, tmp_path / "resumed") == 0
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [e["step"] for e in resumed] == [1, 2, 3, 4]
    assert [e["loss"] for e in resumed] == [e["loss"] for e in straight]
    assert [e["grad_norm"] for e in resumed] == [e["grad_norm"] for e in straight]


def test_without_matplotlib_the_plot_is_a_one_line_note(model_dir, data_file, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert run(model_dir, data_file, tmp_path / "out", "--max-steps", "1") == 0
    err = capsys.readouterr().err
    assert "loss.png not drawn: matplotlib is not installed (pip install matplotlib)" in err, err
    assert not (tmp_path / "out" / "loss.png").exists() and len(read_log(tmp_path / "out")) == 1


@pytest.mark.parametrize("with_tqdm", [True, False], ids=["tqdm", "no-tqdm"])
def test_the_progress_bar_shows_each_steps_loss_and_tokens_per_s(
    model_dir, data_file, tmp_path, monkeypatch, capsys, with_tqdm
):
    import sys

    if with_tqdm:
        pytest.importorskip("tqdm")
    else:  # a line a step on stdout instead of the bar
        monkeypatch.setitem(sys.modules, "tqdm", None)
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert run(model_dir, data_file, tmp_path / "out", quiet=False) == 0
    shown = capsys.readouterr()
    shown = shown.err if with_tqdm else shown.out  # tqdm draws on stderr
    for e in read_log(tmp_path / "out"):
        if with_tqdm:
            expected = f"loss={e['loss']:.4f}, tokens_per_s={e['tokens_per_s']:.0f}"
        else:
            expected = f"step {e['step']}/4 loss {e['loss']:.4f} {e['tokens_per_s']:.0f} tokens/s"
        assert expected in shown, (expected, shown)


# the scalars --report-to tensorboard writes for log.jsonl's keys (on the CPU: no peak memory)
TENSORBOARD_TAGS = {"train/loss": "loss", "train/learning_rate": "learning_rate", "train/grad_norm": "grad_norm",
                    "train/tokens_per_s": "tokens_per_s", "eval/loss": "eval_loss"}  # fmt: skip


def tensorboard_scalars(output):
    """OUTPUT/runs/ as TensorBoard reads it: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "runs"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_float32(x):
    return torch.tensor(x, dtype=torch.float32).item()  # TensorBoard keeps scalars in float32


def test_report_to_tensorboard_writes_the_scalars_of_the_log(model_dir, data_file, tmp_path):
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package")
    out = tmp_path / "out"
    assert run(model_dir, data_file, out, "--report-to", "tensorboard", "--eval-data", str(data_file),
               "--eval-steps", "2") == 0  # fmt: skip
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 1
    scalars, log = tensorboard_scalars(out), read_log(out)
    assert sorted(scalars) == sorted(TENSORBOARD_TAGS)
    for tag, key in TENSORBOARD_TAGS.items():
        assert scalars[tag] == [(e["step"], as_float32(e[key])) for e in log if key in e], tag
    assert [step for step, _ in scalars["eval/loss"]] == [2, 4]


def test_report_to_tensorboard_across_a_resume_and_a_restart(model_dir, data_file, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard package")
    from torch.utils.tensorboard import SummaryWriter

    tensorboard = ("--report-to", "tensorboard")
    assert run(model_dir, data_file, tmp_path / "straight", *tensorboard) == 0
    interrupted_after_first_checkpoint(model_dir, data_file, tmp_path / "resumed", monkeypatch, *tensorboard)
    with SummaryWriter(str(tmp_path / "resumed" / "runs")) as w:  # a step logged after the checkpoint, then lost
        w.add_scalar("train/loss", 123.0, 3)
    assert run(model_dir, data_file, tmp_path / "resumed", *tensorboard) == 0
    straight, resumed = tensorboard_scalars(tmp_path / "straight"), tensorboard_scalars(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) and [s for s, _ in resumed["train/tokens_per_s"]] == [1, 2, 3, 4]
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm"):  # tokens/s is timed: not compared
        assert resumed[tag] == straight[tag], tag
    assert resumed["train/loss"] == [(e["step"], as_float32(e["loss"])) for e in read_log(tmp_path / "resumed")]

    # --no-resume moves the events aside with the rest of the earlier run
    assert run(model_dir, data_file, tmp_path / "resumed", "--no-resume", "--max-steps", "1", *tensorboard) == 0
    assert tensorboard_scalars(tmp_path / "resumed" / "previous-1") == resumed
    assert [step for step, _ in tensorboard_scalars(tmp_path / "resumed")["train/loss"]] == [1]


def test_report_to_tensorboard_flushes_at_each_checkpoint_and_closes_at_the_end(model_dir, data_file, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    calls = []

    class Writer:  # what the run asks of torch's SummaryWriter (train/loss alone, for brevity)
        def __init__(self, log_dir, purge_step):
            calls.append(("open", purge_step))

        def add_scalar(self, tag, value, global_step):
            if tag == "train/loss":
                calls.append(("loss", global_step))

        def flush(self):
            calls.append(("flush",))

        def close(self):
            calls.append(("close",))

    monkeypatch.setattr(cli, "_summary_writer_class", lambda: Writer)
    assert run(model_dir, data_file, tmp_path / "out", "--report-to", "tensorboard") == 0  # checkpoints at 2 and 4
    assert calls == [("open", 1), ("loss", 1), ("loss", 2), ("flush",), ("loss", 3), ("loss", 4), ("flush",),
                     ("close",)]  # fmt: skip


def test_report_to_tensorboard_without_tensorboard_is_a_one_line_error(model_dir, data_file, tmp_path, monkeypatch,
                                                                        capsys):  # fmt: skip
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    assert run(model_dir, data_file, tmp_path / "out", "--report-to", "tensorboard") == 2
    err = capsys.readouterr().err
    assert err == ("qlora-ext finetune: --report-to tensorboard needs the tensorboard package, which is not "
                   "installed: pip install tensorboard\n"), err  # fmt: skip
    assert not (tmp_path / "out").exists()  # refused before the data is read or the model loads


@pytest.mark.parametrize("optim", ["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_resume_is_bit_exact_with_each_optimizer(model_dir, data_file, tmp_path, monkeypatch, optim):
    """r = 64: most adapter matrices have 4096 elements or more, where bitsandbytes' 8-bit optimizers
    keep their state in 8 bits (smaller ones stay in 32). On the CPU the paged optimizers page
    nothing (bitsandbytes warns); their state is saved and resumed all the same."""
    if optim != "adamw":
        pytest.importorskip("bitsandbytes")
    args = ("--optim", optim, "--r", "64")
    assert run(model_dir, data_file, tmp_path / "straight", *args) == 0
    interrupted_after_first_checkpoint(model_dir, data_file, tmp_path / "resumed", monkeypatch, *args)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "resumed" / "checkpoint-2" / "trainer_state.safetensors"))
    if optim.endswith("8bit"):  # 8-bit state was kept (and saved)
        assert any(v.dtype == torch.uint8 for k, v in saved.items() if k.startswith("optim.")), sorted(saved)
    assert run(model_dir, data_file, tmp_path / "resumed", *args) == 0
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "resumed")
    start = adapter_tensors(tmp_path / "straight" / "checkpoint-2")
    assert any(not torch.equal(straight[k], start[k]) for k in straight)
    for k in straight:
        assert_bits_equal(resumed[k], straight[k], k)
    # another optimizer's checkpoint is not resumed
    other = "adamw_8bit" if optim == "adamw" else "adamw"
    if other == "adamw" or pytest.importorskip("bitsandbytes"):
        with pytest.raises(SystemExit, match="other optim"):
            run(model_dir, data_file, tmp_path / "resumed", "--optim", other, "--r", "64", "--max-steps", "6")


def test_bitsandbytes_optimizers_without_bitsandbytes(model_dir, data_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(
        SystemExit, match="bitsandbytes is not installed: pip install bitsandbytes, or pass --optim adamw"
    ):
        run(model_dir, data_file, tmp_path / "out", "--optim", "paged_adamw_32bit")


@requires_cuda
@pytest.mark.cuda
def test_a_paged_optimizer_state_is_paged_again_on_resume(tmp_path):
    """bitsandbytes' load_state_dict puts a paged optimizer's state in ordinary GPU memory; the CLI's
    resume copies it into paged buffers again, and the next step is the uninterrupted one's."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from safetensors.torch import load_file, save_file

    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(512, 256, device="cuda", generator=g) for _ in range(3)]  # 131072 elements: paged
    p = torch.nn.Parameter(torch.randn(512, 256, device="cuda", generator=g))
    opt = bnb.optim.PagedAdamW32bit([p], lr=1e-3, weight_decay=0.0)
    for grad in grads[:2]:
        p.grad = grad.clone()
        opt.step()
    assert getattr(opt.state[p]["state1"], "is_paged", False)
    tensors, meta = finetune_optim.optimizer_tensors(opt)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "s.safetensors"))
    meta = json.loads(json.dumps(meta))

    q = torch.nn.Parameter(p.detach().clone())
    resumed = bnb.optim.PagedAdamW32bit([q], lr=1e-3, weight_decay=0.0)
    state = finetune_optim.optimizer_state(meta, load_file(str(tmp_path / "s.safetensors")))
    resumed.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    finetune_optim.page_state(resumed)
    for key in ("state1", "state2"):
        assert getattr(resumed.state[q][key], "is_paged", False), key
    assert resumed.state[q]["step"] == 2 and isinstance(resumed.state[q]["step"], int)
    p.grad, q.grad = grads[2].clone(), grads[2].clone()
    opt.step()
    resumed.step()
    torch.cuda.synchronize()
    assert_bits_equal(q.detach(), p.detach(), "parameter after the resumed step")


# ---------------------------------------------------------------------------------------------
# under torchrun: 2 gloo processes on the CPU

# torchrun runs this script on each rank in place of `-m qlora_ext`: each rank that opens a log.jsonl
# to write says so in WRITERS/rank-N, and the run stops (as a crash would) right after its first
# checkpoint, once every rank has come out of the save
CRASH_AFTER_FIRST_CHECKPOINT = """
import os, sys
from pathlib import Path
from qlora_ext import cli

class Log(cli._Log):
    def __init__(self, path, *args, **kwargs):
        if path is not None:
            (Path(os.environ["WRITERS"]) / f"rank-{os.environ['RANK']}").write_text(str(path))
        super().__init__(path, *args, **kwargs)

def save_then_crash(*args, save=cli._save_checkpoint, **kwargs):
    save(*args, **kwargs)
    raise KeyboardInterrupt

cli._Log, cli._save_checkpoint = Log, save_then_crash
sys.exit(cli.main(sys.argv[1:]))
"""


def torchrun(model_dir, data_file, output, *extra, script=None, nproc=2, device="cpu", **env_vars):
    """`torchrun --standalone --nproc-per-node 2 -m qlora_ext finetune ...` (run()'s arguments), gloo on
    the CPU (NCCL with device="cuda"), in a subprocess with `env_vars`; the completed process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1", **env_vars)  # torchrun's default for several processes, said aloud
    package_root = str(Path(qlora_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    target = [str(script)] if script is not None else ["-m", "qlora_ext"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target,
               *finetune_args(model_dir, data_file, output, *extra, device=device)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def eval_args(data_file, tmp_path_factory):
    """An eval loss at steps 2 and 4 over 5 examples: 3 batches of 2, so that under torchrun one rank
    has 2 and the other 1 (and, under FSDP2, runs a forward whose result it drops)."""
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(data_file.read_text().splitlines(keepends=True)[:5]))
    return ("--eval-data", str(path), "--eval-steps", "2")


def one_thread_run(model_dir, data_file, output, *extra):
    """run() on one thread, as each torchrun rank runs: the CPU products reduce in the ranks' order."""
    from helpers import one_thread

    with one_thread():
        assert run(model_dir, data_file, output, *extra) == 0


@pytest.fixture(scope="module")
def one_process_run(model_dir, data_file, eval_args, tmp_path_factory):
    """run()'s 4 steps, with eval_args, in this process on one thread: the reference."""
    out = tmp_path_factory.mktemp("one-process") / "out"
    one_thread_run(model_dir, data_file, out, *eval_args)
    return out


def assert_same_run(actual, expected):
    """The same log (bit for bit, tokens/s aside), adapters and optimizer state at each checkpoint."""
    from safetensors.torch import load_file

    drop = lambda log: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in log]  # noqa: E731
    assert drop(read_log(actual)) == drop(read_log(expected))
    for where in ("", "checkpoint-2", "checkpoint-4"):
        a, e = adapter_tensors(actual / where), adapter_tensors(expected / where)
        assert sorted(a) == sorted(e), where
        for k in e:
            assert_bits_equal(a[k], e[k], f"{where} {k}")
    a = load_file(str(actual / "checkpoint-4" / "trainer_state.safetensors"))
    e = load_file(str(expected / "checkpoint-4" / "trainer_state.safetensors"))
    assert sorted(a) == sorted(e) and any(k.startswith("optim.") for k in e)
    for k in e:
        if k.startswith("optim."):
            assert_bits_equal(a[k], e[k], f"optimizer state {k}")
    state, ref = (json.loads((d / "checkpoint-4" / "trainer_state.json").read_text()) for d in (actual, expected))
    assert state["optimizer"] == ref["optimizer"] and state["micro"] == ref["micro"] == 8


def needs_gloo():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_matches_one_process(model_dir, data_file, eval_args, one_process_run, tmp_path, mode):
    """2 gloo ranks, each step's 2 micro-batches one a rank: the one-process run's losses, gradient
    norms, learning rates, eval losses, adapters and optimizer state, bit for bit (DDP and FSDP2
    average two gradients as g0 / 2 + g1 / 2, as one process accumulates loss / 2 twice; one thread
    everywhere); rank 0 alone writes."""
    import importlib.util

    needs_gloo()
    # TensorBoard names its event file after the writing process: two writers would leave two
    tensorboard = ("--report-to", "tensorboard") if importlib.util.find_spec("tensorboard") else ()
    out = tmp_path / "out"
    done = torchrun(model_dir, data_file, out, *(("--fsdp",) if mode == "fsdp" else ()), *eval_args, *tensorboard)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, one_process_run)
    plot = ["loss.png"] if importlib.util.find_spec("matplotlib") else []  # CI's machine has no matplotlib
    assert sorted(p.name for p in out.iterdir()) == sorted(["adapter_config.json", "adapter_model.safetensors",
        "checkpoint-2", "checkpoint-4", "log.jsonl"] + plot + (["runs"] if tensorboard else []))  # fmt: skip
    if tensorboard:
        assert len(list((out / "runs").iterdir())) == 1


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_resumes_after_a_crash(model_dir, data_file, eval_args, one_process_run, tmp_path, mode):
    """Stopped right after its checkpoint of step 2, then launched again, a run under torchrun ends
    as the uninterrupted one-process run, bit for bit; so does one process resuming its checkpoint."""
    import shutil

    needs_gloo()
    extra = (("--fsdp",) if mode == "fsdp" else ()) + eval_args
    script = tmp_path / "crash_after_first_checkpoint.py"
    script.write_text(CRASH_AFTER_FIRST_CHECKPOINT)
    resumed, writers = tmp_path / "resumed", tmp_path / "writers"
    writers.mkdir()
    crashed = torchrun(model_dir, data_file, resumed, *extra, script=script, WRITERS=str(writers))
    assert crashed.returncode != 0 and "KeyboardInterrupt" in crashed.stderr, crashed.stderr[-3000:]
    assert (resumed / "checkpoint-2").is_dir() and not (resumed / "adapter_model.safetensors").exists()
    assert [p.name for p in writers.iterdir()] == ["rank-0"]  # rank 0 alone writes log.jsonl
    shutil.copytree(resumed, tmp_path / "resumed-in-one-process")
    done = torchrun(model_dir, data_file, resumed, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(resumed, one_process_run)
    # the checkpoint is one device's: one process resumes it to the same run
    one_thread_run(model_dir, data_file, tmp_path / "resumed-in-one-process", *eval_args)
    assert_same_run(tmp_path / "resumed-in-one-process", one_process_run)


@pytest.mark.distributed
@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_CUDA and torch.cuda.device_count() >= 2), reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_on_two_gpus_matches_one_gpu(model_dir, data_file, eval_args, tmp_path, mode):
    """2 NCCL ranks, one GPU each, against one process on one GPU: the same log, adapters and optimizer
    state, bit for bit (the same kernels on the same kind of GPU; DDP and FSDP2 average two gradients as
    one process accumulates them). Runs only where a machine lends 2 GPUs."""
    import os
    import subprocess
    import sys

    one_gpu = tmp_path / "one-gpu"  # in a process of its own, as the ranks: torch's default cuBLAS settings
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-m", "qlora_ext", *finetune_args(model_dir, data_file, one_gpu, *eval_args,
                          device="cuda")], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "two-gpus"
    done = torchrun(model_dir, data_file, out, *(("--fsdp",) if mode == "fsdp" else ()), *eval_args, device="cuda")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, one_gpu)


def test_fsdp_without_torchrun_is_a_one_line_error(model_dir, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run(model_dir, data_file, tmp_path / "out", "--fsdp") == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora-ext finetune: --fsdp shards the model over the processes of torchrun") and (
        "WORLD_SIZE is unset" in err and err.count("\n") == 1
    ), err
    assert not (tmp_path / "out").exists()  # refused before anything is read or written


@pytest.mark.parametrize(
    "args, message",
    [
        (("--grad-accum", "3"), "--grad-accum 3 is the forward passes of a step on all 2 ranks together"),
        (("--fsdp", "--optim", "paged_adamw_32bit"), "--optim paged_adamw_32bit is bitsandbytes' optimizer"),
        (("--device", "cuda:1"), "--device cuda:1: under torchrun each rank takes the GPU of its LOCAL_RANK"),
    ],
)
def test_what_torchrun_cannot_run_is_refused_before_it_starts(model_dir, data_file, tmp_path, monkeypatch, capsys,
                                                               args, message):  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before the process group is made
    assert run(model_dir, data_file, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_fsdp_on_a_model_without_decoder_layers_is_refused():
    from qlora_ext.finetune_dist import DistError, Ranks

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(DistError, match="--fsdp shards the model per decoder layer, and --model has none to shard"):
        Ranks(mode="fsdp").wrap(model)
