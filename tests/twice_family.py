"""twice: vanilla weights, the stack run twice (a fixed depth of 2, no pondering embedding).

A test family written as a file of megaponder/models/ is: sibling imports only. It is the one
source of the toy family of two tests: tests/test_family_in_one_file.py copies it to
``megaponder/models/twice.py`` of a copied package, and tests/test_family_spec.py loads it as
a user's own module outside the package (its sibling imports made absolute). Not importable as
it is: it has no package here."""
from .base import CausalLM, ModelOutput, default_position_ids, with_fixed_token_stats
from .flops import cached_rows
from .spec import DECODERS, FamilySpec, register_family


class TwiceLM(CausalLM):
    num_passes = 2

    @with_fixed_token_stats
    def forward(self, input_ids, targets=None, position_ids=None, attention_mask=None,
                segment_ids=None) -> ModelOutput:
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        spec = self.attention_spec(attention_mask, segment_ids)
        x = self.input_embeddings(input_ids)
        for _ in range(self.num_passes):
            x, _ = self.stack(x, position_ids, spec, apply_final_norm=False)
        logits = self.head(self.stack.final_norm(x))
        stats = {"mean_iters": 2.0, "flops_ratio": 2.0}
        if targets is None:
            return ModelOutput(logits=logits, stats=stats)
        loss = self.lm_loss(logits, targets)
        return ModelOutput(logits=logits, loss=loss, lm_loss=loss, stats=stats)


register_family(FamilySpec(
    name="twice", model_cls=TwiceLM, kind="fixed", decoder=DECODERS + "LoopDecoder",
    train_flops=lambda dm, t, causal, jacobi_passes=None: 2 * dm.rows(t, t, causal) + t * dm.head,
    inference_flops=lambda dm, t, activity=None: 2 * cached_rows(dm, t) + t * dm.head))
