"""`personal.method: finetune`: FedAvg as `none` runs it, then each client fine-tunes the final global adapter on
its own prompts (`spearfl.personal.base.after_federation_round` without a teacher): TAP's "regular and local"
baseline (main_training.py: the final global model fine-tuned by train_finetune)."""

from spearfl.personal.base import PersonalMethod, after_federation_round


class FineTune(PersonalMethod):
    keeps_personal = True

    def after_federation(self, context, client, global_state, round_index):
        result = after_federation_round(context, client, global_state, None, round_index)
        return result.state, result.metrics
