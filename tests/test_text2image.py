"""Text-to-image models (vdu.text2image) in the engine, on a tiny randomly initialised Stable Diffusion
folder the test writes (UNet2DConditionModel, CLIP text encoder, a tokenizer with a tiny vocabulary, VAE):
ESD and RU run on VAE latents with a prompt as the concept, only the chosen weights change, the erased
prompt's noise prediction moves towards ESD's target while an unrelated prompt's barely moves, and the
saved folder reloads as a StableDiffusionPipeline."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

from vdu.data import UnlearnData  # noqa: E402
from vdu.text2image import encode_images, load_text2image  # noqa: E402
from vdu.unlearning import unlearn  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "car", "van", "gogh", "style"]
LOOP = dict(steps=6, batch_size=4, lr=1e-3, probe_every=0, progress=False, seed=0)


def _tokenizer_files(folder):
    """A CLIP BPE vocabulary and merges for WORDS, character by character."""
    chars = sorted(set("".join(WORDS)))
    vocab = {}
    for w in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(w, len(vocab))
    merges, seen = ["#version: 0.2"], set()
    for w in WORDS:
        s = list(w[:-1]) + [w[-1] + "</w>"]
        while len(s) > 1:
            if (s[0], s[1]) not in seen:
                merges.append(f"{s[0]} {s[1]}")
                seen.add((s[0], s[1]))
            s = [s[0] + s[1]] + s[2:]
            vocab.setdefault(s[0], len(vocab))
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return len(vocab)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    out = tmp_path_factory.mktemp("sd") / "tiny-sd"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8)
    n = _tokenizer_files(out / "tok-src")
    tok = CLIPTokenizer(str(out / "tok-src" / "vocab.json"), str(out / "tok-src" / "merges.txt"), model_max_length=8)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    import shutil
    shutil.rmtree(out / "tok-src")
    pipe.save_pretrained(out)
    return out


def _concept_latents(vae, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return encode_images(vae, torch.rand(n, 3, 8, 8, generator=g) * 2 - 1)


def test_esd_on_cross_attention_moves_the_erased_prompt_and_reloads(sd_folder, tmp_path):
    unet, sched, vae = load_text2image(sd_folder, ["a photo of cat", "a photo of car"], trainable="xattn")
    assert unet.prompts[-1] == "" and unet.config.num_class_embeds == 3
    before = {n: p.detach().clone() for n, p in unet.unet.named_parameters()}
    teacher = __import__("copy").deepcopy(unet).eval()
    lat = _concept_latents(vae)
    assert lat.abs().max() > 0 and torch.isfinite(lat).all()
    g = torch.Generator().manual_seed(5)
    xt, t = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 1000, (16,), generator=g)

    def gap(model, k):          # distance of prompt k's prediction from ESD's target (eta 1)
        with torch.no_grad():
            e0, ec = teacher(xt, t, torch.full((16,), 2)).sample, teacher(xt, t, torch.full((16,), 0)).sample
            target = e0 - 1.0 * (ec - e0)
            return (model(xt, t, torch.full((16,), k)).sample - (target if k == 0 else
                    teacher(xt, t, torch.full((16,), k)).sample)).pow(2).mean().item()

    g0 = gap(unet, 0)
    out = unlearn(unet, UnlearnData(lat, forget_class=0, latent=True), "esd", sched, eta=1.0, xt_source="forget",
                  save_to=str(tmp_path / "no-cat"), **LOOP)
    log = out.unlearn_log
    assert log.steps_done == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log.steps)
    assert gap(out, 0) < g0                                  # the erased prompt moved towards the target
    assert gap(out, 1) < 0.1 * g0 + 1e-12                     # an unrelated prompt barely moved
    changed = {n for n, p in out.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn2." in n for n in changed)  # ESD-x: cross-attention only
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "no-cat", safety_checker=None)
    emb = unet.embeddings[:1].expand(2, -1, -1)
    with torch.no_grad():
        a = pipe.unet(xt[:2], t[:2], encoder_hidden_states=emb).sample
        b = out.unet(xt[:2], t[:2], encoder_hidden_states=emb).sample
    assert torch.allclose(a, b, atol=1e-5)
    assert json.loads((tmp_path / "no-cat" / "prompts.json").read_text())[0] == "a photo of cat"
    assert (tmp_path / "no-cat" / "unlearn.json").exists()


def test_ru_and_lora_run_on_prompts(sd_folder, tmp_path):
    unet, sched, vae = load_text2image(sd_folder, ["a photo of cat"], trainable="lora", lora_rank=2)
    trainable = [n for n, p in unet.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    lat = _concept_latents(vae)
    out = unlearn(unet, UnlearnData(lat, forget_class=0, latent=True), "ru", sched, kl_min=4.0, dual_every=2,
                  dual_lr=0.1, sample_steps=2, save_to=str(tmp_path / "ru"), **LOOP)
    assert out.unlearn_log.duals and out.unlearn_log.stop_reason in ("max_steps", "infeasible")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "ru", safety_checker=None)
    g = torch.Generator().manual_seed(1)
    xt, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    with torch.no_grad():          # the saved UNet has the adapter merged in
        a = pipe.unet(xt, t, encoder_hidden_states=unet.embeddings[:1].expand(2, -1, -1)).sample
        b = out(xt, t, torch.zeros(2, dtype=torch.long)).sample
    assert torch.allclose(a, b, atol=1e-4)
    base = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)   # the adapter alone, on the original
    with torch.no_grad():
        c0 = base.unet(xt, t, encoder_hidden_states=unet.embeddings[:1].expand(2, -1, -1)).sample
    base.load_lora_weights(tmp_path / "ru" / "lora")
    with torch.no_grad():
        c = base.unet(xt, t, encoder_hidden_states=unet.embeddings[:1].expand(2, -1, -1)).sample
    assert not torch.allclose(c, c0, atol=1e-6) and torch.allclose(c, b, atol=1e-4)
    # a second run from the saved folder saves cleanly (no stale files of the first run come along)
    again, sched2, _ = load_text2image(tmp_path / "ru", ["a photo of cat"], trainable="lora", lora_rank=2)
    unlearn(again, UnlearnData(lat, forget_class=0, latent=True), "neggrad", sched2, save_to=str(tmp_path / "ru2"),
            **{**LOOP, "steps": 1})
    assert not (tmp_path / "ru2" / "prompts.json").read_text() == "" and (tmp_path / "ru2" / "lora").is_dir()


def test_text2image_bad_inputs(sd_folder, tmp_path):
    import shutil
    with pytest.raises(ValueError, match="lora_rank must be an integer >= 1"):
        load_text2image(sd_folder, ["a photo of cat"], trainable="lora", lora_rank=0)
    with pytest.raises(ValueError, match="trainable must be one of"):
        load_text2image(sd_folder, ["a photo of cat"], trainable="attn")
    bare = tmp_path / "bare"
    shutil.copytree(sd_folder, bare, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(ValueError, match="prompts need a text encoder"):
        load_text2image(bare, ["a photo of cat"])
    unet, _, _ = load_text2image(bare, embeddings=torch.zeros(2, 8, 16))     # embeddings need no text encoder
    assert unet.config.num_class_embeds == 2
    with pytest.raises(ValueError, match="another text encoder"):
        load_text2image(bare, embeddings=torch.zeros(2, 8, 32))
    shutil.rmtree(bare / "unet")
    with pytest.raises(FileNotFoundError, match=r"missing \['unet'\]"):
        load_text2image(bare, embeddings=torch.zeros(2, 8, 16))
    with pytest.raises(FileNotFoundError, match="no Stable Diffusion folder"):
        load_text2image(tmp_path / "nowhere", ["a photo of cat"])
    with pytest.raises(ValueError, match="images must be in"):
        UnlearnData(torch.full((2, 4, 8, 8), 3.0))           # latents need latent=True
    vpred = tmp_path / "vpred"
    shutil.copytree(sd_folder, vpred)
    cfg = json.loads((vpred / "scheduler" / "scheduler_config.json").read_text())
    (vpred / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="epsilon prediction"):
        load_text2image(vpred, ["a photo of cat"])
    from vdu.diffusion import nll_bits_per_dim
    unet, sched, _ = load_text2image(sd_folder, ["a photo of cat"])
    with pytest.raises(ValueError, match="not for VAE latents"):
        nll_bits_per_dim(unet, sched, torch.zeros(2, 4, 8, 8), progress=False)


def test_command_line_erases_a_concept(sd_folder, tmp_path, capsys):
    from vdu.__main__ import main
    out = tmp_path / "no-cat"
    assert main(["unlearn", str(sd_folder), "--concept", "a photo of cat", "--method", "esd", "--trainable", "xattn",
                 "--concept-samples", "4", "--steps", "2", "--batch-size", "2", "--no-progress", "--probe-every", "0",
                 "--xt-source", "forget", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["concept"] == "a photo of cat" and printed["steps_done"] == 2
    assert StableDiffusionPipeline.from_pretrained(out, safety_checker=None).unet is not None
    with pytest.raises(SystemExit):
        main(["unlearn", str(sd_folder), "--concept", "cat", "--forget-class", "1", "--out", str(tmp_path / "x")])
    assert "exactly one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["unlearn", str(tmp_path / "nowhere"), "--concept", "cat", "--method", "esd", "--out", str(tmp_path / "y")])
    assert "no Stable Diffusion folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["unlearn", str(sd_folder), "--concept", "cat", "--method", "amnesia", "--out", str(tmp_path / "z")])
    assert "with --concept the methods are" in capsys.readouterr().err
