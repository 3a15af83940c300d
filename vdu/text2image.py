"""Text-to-image diffusion models (the Stable Diffusion folder layout) in the unlearning engine.

The engine's methods talk to a class-conditional UNet: ``model(x_t, t, class_labels=k)``, the last class
being the null (unconditional) one. :class:`PromptUNet` gives a Stable Diffusion ``UNet2DConditionModel``
that interface: a fixed table of prompt embeddings (the text encoder's output for each prompt, then for
the empty prompt) indexed by ``class_labels``. ESD, RU, NegGrad and VDU then run unchanged, on VAE
latents: prompt ``k`` is the concept to erase (``forget_class=k``), the empty prompt is the null class.

    unet, sched, vae = load_text2image("path/to/stable-diffusion", ["a photo of a cat"], trainable="xattn")
    m = unlearn(unet, UnlearnData(encode_images(vae, cat_images), forget_class=0, latent=True), "esd", sched,
                negative_guidance=1.0, save_to="runs/no-cats")   # a StableDiffusionPipeline folder

``trainable``: ``"full"`` (every UNet weight), ``"xattn"`` (only the cross-attention layers ``attn2``: ESD-x,
erasing what the prompt triggers), ``"noxattn"`` (everything but the cross-attention; ESD-u also freezes the
time embedding and the output layer) or ``"lora"`` (low-rank adapters on
the attention projections through peft, as diffusers' own training scripts do; ``lora_rank``). The saved
folder loads with ``StableDiffusionPipeline.from_pretrained`` (a LoRA run saves merged weights, and the
adapter alone in ``lora/``, which ``pipe.load_lora_weights`` applies to the original model). Only
epsilon-prediction models are accepted (the engine's losses treat the UNet's output as the noise), and
the NLL bound in bits/dim is refused on latents (it is defined for images in [-1, 1]).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import DDPMScheduler
from diffusers.configuration_utils import FrozenDict

COMPONENTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer")
TRAINABLE = ("full", "xattn", "noxattn", "lora")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class PromptUNet(nn.Module):
    """A text-conditioned UNet seen as a class-conditional one: ``class_labels`` index ``prompts`` (the last
    entry is the empty prompt, the null class); ``embeddings`` (len(prompts), tokens, dim) are fixed."""

    latent_space = True          # inputs are VAE latents, not images in [-1, 1]

    def __init__(self, unet: nn.Module, embeddings: torch.Tensor, prompts: list[str], source: str | None = None):
        super().__init__()
        if embeddings.ndim != 3 or len(embeddings) != len(prompts):
            raise ValueError(f"need one (tokens, dim) embedding per prompt: {len(prompts)} prompts, embeddings of "
                             f"shape {tuple(embeddings.shape)}")
        dim = unet.config.cross_attention_dim
        if embeddings.shape[-1] != dim:
            raise ValueError(f"prompt embeddings have width {embeddings.shape[-1]} but the UNet's cross-attention "
                             f"expects {dim}: they come from another text encoder")
        self.unet, self.prompts, self.source = unet, list(prompts), source
        self.register_buffer("embeddings", embeddings.detach().clone())
        self.config = FrozenDict(in_channels=unet.config.in_channels, sample_size=unet.config.sample_size,
                                 num_class_embeds=len(prompts), cross_attention_dim=dim)

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        if class_labels is None:
            class_labels = torch.full((len(sample),), len(self.prompts) - 1, device=sample.device)
        emb = self.embeddings[class_labels.to(self.embeddings.device)].to(sample.dtype)
        return self.unet(sample, timestep, encoder_hidden_states=emb, return_dict=return_dict)

    def save_pipeline(self, folder, scheduler=None, overwrite: bool = False, **extra_json) -> Path:
        """Write a ``StableDiffusionPipeline`` folder: the source folder's other components, this UNet
        (``save_pretrained``; LoRA weights merged, the adapter alone in ``lora/``) and ``<name>.json`` files,
        atomically (see :func:`vdu.models.save_model`)."""
        import copy

        from .models import atomic_folder
        if self.source is None:
            raise ValueError("this PromptUNet was not loaded from a Stable Diffusion folder: save self.unet instead")

        src = Path(self.source)
        parts = [k for k in json.loads((src / "model_index.json").read_text()) if not k.startswith("_")] \
            if (src / "model_index.json").exists() else [c for c in COMPONENTS if (src / c).is_dir()]

        def write(tmp: Path):
            if (src / "model_index.json").exists():
                shutil.copy2(src / "model_index.json", tmp / "model_index.json")
            for name in parts:                   # the pipeline's components only (no earlier run's files)
                if name != "unet" and (src / name).is_dir():
                    shutil.copytree(src / name, tmp / name)
            unet = copy.deepcopy(self.unet)
            if getattr(unet, "peft_config", None):
                from diffusers import StableDiffusionPipeline
                from diffusers.utils import convert_state_dict_to_diffusers
                from peft.utils import get_peft_model_state_dict
                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
                StableDiffusionPipeline.save_lora_weights(tmp / "lora", unet_lora_layers=layers,
                                                          safe_serialization=True)
                unet.fuse_lora()
                unet.unload_lora()
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            (tmp / "prompts.json").write_text(json.dumps(self.prompts, indent=2))
            for key, obj in extra_json.items():
                (tmp / f"{key}.json").write_text(json.dumps(obj, indent=2))

        return atomic_folder(folder, overwrite, write)


def _need(module: str, *names):
    import importlib
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for Stable Diffusion folders: pip install 'vdu[text2image]'") from e
    return tuple(getattr(mod, n) for n in names)


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states for ``prompts`` (padded to the tokenizer's maximum length), as
    Stable Diffusion conditions on them."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0].float()


def _check_folder(folder: Path, need: tuple[str, ...]) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"no Stable Diffusion folder at {folder} (nothing is downloaded here: put a "
                                f"save_pretrained StableDiffusionPipeline folder there)")
    missing = [c for c in need if not (folder / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete Stable Diffusion folder: missing {missing} "
                                f"(a StableDiffusionPipeline.save_pretrained folder has {list(COMPONENTS)})")


def load_text2image(folder, prompts: list[str] | None = None, embeddings: torch.Tensor | None = None,
                    trainable: str = "full", lora_rank: int = 4, device="cpu"):
    """``(PromptUNet, DDPMScheduler, vae)`` from a local Stable Diffusion folder.

    ``prompts``: the concepts (and anchors) the run uses, encoded once by the folder's text encoder; the
    empty prompt is appended as the null class. Or ``embeddings`` (n, tokens, dim) for n prompts computed
    elsewhere (the last one is taken as the null class; no text encoder needed). ``trainable`` picks the
    weights the unlearning loop may change (module docstring). ``vae`` is None when the folder has none."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    folder = Path(folder)
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if (prompts is None) == (embeddings is None):
        raise ValueError("give either prompts (encoded by the folder's text encoder) or embeddings, not both or neither")
    _check_folder(folder, ("unet", "scheduler"))
    if prompts is not None:
        if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
            raise ValueError(f"prompts need a text encoder and a tokenizer, and {folder} has "
                             f"{'no text_encoder' if not (folder / 'text_encoder').is_dir() else 'no tokenizer'}: "
                             f"pass embeddings= instead")
        CLIPTextModel, CLIPTokenizer = _need("transformers", "CLIPTextModel", "CLIPTokenizer")
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        te = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device).eval()
        prompts = list(prompts) + [""]
        embeddings = encode_prompts(tok, te, prompts)
        del te
    else:
        prompts = [f"<embedding {i}>" for i in range(len(embeddings) - 1)] + [""]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device).float()
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if sched_cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{folder} predicts {sched_cfg['prediction_type']!r}; the engine's losses and samplers "
                         f"treat the UNet's output as the noise (epsilon prediction), so it is not supported")
    sched_cfg.update(clip_sample=False, thresholding=False)   # latents are not clipped to [-1, 1]
    scheduler = DDPMScheduler.from_config({k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    vae = AutoencoderKL.from_pretrained(folder / "vae").to(device).eval() if (folder / "vae").is_dir() else None
    set_trainable(unet, trainable, lora_rank)
    return PromptUNet(unet, embeddings.to(device), prompts, source=str(folder)), scheduler, vae


def set_trainable(unet: nn.Module, trainable: str, lora_rank: int = 4) -> int:
    """Freeze all but the chosen weights of ``unet`` (``TRAINABLE``); returns the number left trainable."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if trainable == "lora":
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank must be an integer >= 1, got {lora_rank!r}")
        (LoraConfig,) = _need("peft", "LoraConfig")
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    else:
        for name, p in unet.named_parameters():
            cross = ".attn2." in name
            p.requires_grad_(trainable == "full" or (trainable == "xattn") == cross)
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"trainable={trainable!r} leaves no weight to train in this UNet (no cross-attention?)")
    return n


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """VAE latents (the mean of the posterior, times the VAE's scaling factor) of images in [-1, 1]: the
    forget set of a text-to-image run (``UnlearnData(latents, latent=True)``)."""
    from .models import check_image_values
    if vae is None:
        raise ValueError("this folder has no VAE: pass latents instead of images")
    check_image_values(images)
    dev = next(vae.parameters()).device
    f = vae.config.scaling_factor
    return torch.cat([vae.encode(images[i:i + batch_size].to(dev)).latent_dist.mean.float() * f
                      for i in range(0, len(images), batch_size)]).cpu()
