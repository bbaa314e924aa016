"""The fused head is used only where the model's logits are exactly ``hidden @ W^T``."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from synthunlearn.errors import ConfigError
from synthunlearn.training.loss_module import PolicyWithLogProbs, check_plain_head


class _Head(nn.Module):
    """Just what check_plain_head reads: the config and the output layer."""

    def __init__(self, bias=False, **config):
        super().__init__()
        self.config = SimpleNamespace(**config)
        self.head = nn.Linear(4, 8, bias=bias)

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("attr, value", [
    ("final_logit_softcapping", 30.0), ("final_logit_softcapping", 1.0),  # Gemma-2/3: a cap of 1 still caps
    ("logit_scale", 0.0625),                                              # Cohere
    ("logits_scaling", 8.0),                                              # Granite
    ("lm_head_multiplier", 2.0),                                          # Falcon-H1
    ("mup_width_multiplier", 8.0),                                        # muP (Phi-3-small)
])
def test_logit_transforms_are_refused_naming_the_attribute(attr, value):
    with pytest.raises(ConfigError, match=f"model.path: .*{attr}"):
        check_plain_head(_Head(**{attr: value}), "model.path")


@pytest.mark.parametrize("config", [{}, {"logits_scaling": 1.0}, {"final_logit_softcapping": None},
                                    {"logit_scale": 1}, {"lm_head_multiplier": 1.0}])
def test_identity_values_are_accepted(config):
    check_plain_head(_Head(**config), "model.path")


def test_a_head_with_bias_is_refused():
    with pytest.raises(ConfigError, match="bias-free"):
        check_plain_head(_Head(bias=True), "reference.path")


@pytest.mark.parametrize("scaling", [1.0, 8.0])
def test_granite_fused_logprobs_equal_the_model_exactly_when_accepted(scaling):
    """Granite divides its logits by logits_scaling: at 1.0 the fused log-probs are the model's;
    at 8.0 they would differ (a temperature), so the check must refuse the model."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, logits_scaling=scaling,
                           tie_word_embeddings=False)
    model = GraniteForCausalLM(config).eval()
    ids = torch.randint(0, 96, (1, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        fused = PolicyWithLogProbs(model, backend="torch")(ids, mask, ids.clone(), torch.tensor([0])).logp
        direct = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0, :-1].double(), -1)
    direct = direct.gather(-1, ids[0, 1:, None])[:, 0]
    if scaling == 1.0:
        check_plain_head(model, "model.path")
        torch.testing.assert_close(fused.double(), direct, rtol=1e-5, atol=1e-5)
    else:
        assert (fused.double() - direct).abs().max() > 1e-3
        with pytest.raises(ConfigError, match="logits_scaling=8.0"):
            check_plain_head(model, "model.path")
