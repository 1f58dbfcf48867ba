"""The reward model as an MLflow pyfunc model: ``mlflow.pyfunc.load_model("models:/flywheel-reward@champion")
.predict(pd.DataFrame({"prompt": [...], "answer": [...]}))`` returns one reward per row. A prompt is a string (one
user turn), a list of ``{role, content}`` messages, or a JSON string of such a list. Loading needs the flywheel
package installed (the scoring code is Flywheel's own: flywheel/models/reward.py)."""

from __future__ import annotations

import json
import warnings

import mlflow.pyfunc


def as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        text = prompt.strip()
        if text.startswith("["):
            try:
                return as_messages(json.loads(text))
            except ValueError:
                pass
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def _without_type_hint_advice(show):
    def showwarning(message, *args, **kwargs):
        if "Add type hints to the `predict` method" not in str(message):
            show(message, *args, **kwargs)

    return showwarning


# MLflow advises type hints on predict when the class is defined (in every process that unpickles the model: the
# release's smoke check printed it); the model is logged with an explicit signature, so the advice is noise here.
# MLflow puts its own "once" filter in front of any filter, so the advice is dropped where it would be shown.
with warnings.catch_warnings():
    warnings.showwarning = _without_type_hint_advice(warnings.showwarning)

    class RewardScorer(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from flywheel.models.reward import RewardModel

            self.model = RewardModel.load(context.artifacts["reward"])

        def predict(self, context, model_input, params=None):
            import pandas as pd

            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            missing = {"prompt", "answer"} - set(frame.columns)
            if missing:
                raise ValueError(f"reward model input needs columns prompt and answer; missing {sorted(missing)}")
            batch = int((params or {}).get("batch_size", 32))
            scores = self.model.score(
                [as_messages(p) for p in frame["prompt"]], [str(a) for a in frame["answer"]], batch
            )
            return pd.DataFrame({"reward": scores})
