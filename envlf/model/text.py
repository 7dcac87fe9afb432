"""Text encoder: a Hugging Face BERT-family model (MiniLM-L6 for ``lite``, BERT-base for ``base``).

The uni-modal text encoder is the bottom ``num_layers`` layers of the pretrained model. The
fusion encoder is initialised from the model's upper layers (``FusionConfig.init_from_text_layers``);
those weights are handed over by `pretrained_layer_weights` before the text model is cut,
so a 12-layer BERT becomes a 6-layer text encoder + 6 fusion layers, as in ALBEF.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from envlf.model.config import EnVLFConfig, TextConfig
from envlf.model import weights
from envlf.model.openclip import load_clip_tokenizer

log = logging.getLogger(__name__)

# Hugging Face's "sdpa" path measured 10x slower than "eager" for short captions on 2 CPU
# cores here (transformers 5.24, torch 2.14: ~0.7 s vs 0.05 s for 32 x 16 tokens); the maths
# is the same, so use eager everywhere.
ATTN_IMPL = "eager"


def load_tokenizer(source: str):
    """A tokenizer from a source string ('package:...', 'hub:...', 'open_clip:bpe') or a
    checkpoint directory."""
    from transformers import AutoTokenizer

    if source.startswith("open_clip:"):
        return load_clip_tokenizer()
    path = weights.text_source_path(source)
    offline = not source.startswith("hub:")
    return AutoTokenizer.from_pretrained(path, local_files_only=offline)


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class TextEncoder(nn.Module):
    def __init__(self, cfg: EnVLFConfig, pretrained: bool = True):
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        t: TextConfig = cfg.text
        self.cfg = t
        self.fusion_init: list[dict[str, torch.Tensor]] = []  # handed to the fusion encoder once
        if pretrained and t.weights:
            _quiet_transformers()
            path = weights.text_source_path(t.weights)
            model = AutoModel.from_pretrained(path, local_files_only=not t.weights.startswith("hub:"),
                                              add_pooling_layer=False, attn_implementation=ATTN_IMPL)
            layers = model.encoder.layer
            self.fusion_init = [_layer_state(layers[i]) for i in cfg.fusion.init_from_text_layers]
            n = t.num_layers or len(layers)
            model.encoder.layer = layers[:n]
            model.config.num_hidden_layers = n
            t.num_layers = n
            t.hf_config = _config_dict(model.config)
        else:
            if not t.hf_config:
                raise ValueError("text.hf_config is empty: a model without pretrained text weights needs it")
            hf = dict(t.hf_config)
            if t.num_layers:
                hf["num_hidden_layers"] = t.num_layers
            hf_cfg = BertConfig(**hf)
            hf_cfg._attn_implementation = ATTN_IMPL
            model = BertModel(hf_cfg, add_pooling_layer=False)
            t.num_layers = model.config.num_hidden_layers
        self.bert = model
        self.hidden_size = model.config.hidden_size
        self.set_trainable_layers(t.trainable_layers)

    def dims(self) -> tuple[int, int, int, float, int]:
        """(hidden, heads, intermediate, layer-norm eps, vocabulary) for the fusion encoder."""
        c = self.bert.config
        return c.hidden_size, c.num_attention_heads, c.intermediate_size, c.layer_norm_eps, c.vocab_size

    def set_trainable_layers(self, n: int) -> None:
        """Fine-tune the top n layers (-1: everything, embeddings included)."""
        everything = n < 0
        for p in self.bert.parameters():
            p.requires_grad_(everything)
        if not everything:
            for layer in list(self.bert.encoder.layer)[len(self.bert.encoder.layer) - n:] if n else []:
                for p in layer.parameters():
                    p.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids + mask -> (B, T, hidden) last hidden states."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, hidden): masked mean (MiniLM's sentence embedding) or [CLS]."""
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings


def _layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _config_dict(hf_config) -> dict:
    """The BertConfig fields that rebuild the architecture (no paths, no run-time flags)."""
    keep = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
            "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps",
            "pad_token_id")
    d = hf_config.to_dict()
    return {k: d[k] for k in keep if k in d}
