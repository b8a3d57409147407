"""FB-Score (Factual Bias Score): an ``evaluate`` metric for gender bias in code LLMs."""

import datasets
import evaluate

from mg_editing.scoring import fb_score

_CITATION = """\
@article{mgediting,
  title = {Mitigating Gender Bias in Code Large Language Models via Model Editing},
  note  = {CodeGenBias, FB-Score and MG-Editing},
}
"""

_DESCRIPTION = """\
FB-Score measures how far a model's preference between "he" and "she" after a CodeGenBias
prompt stands from the real-world gender share of the prompt's profession (Bolukbasi et al.'s
definitional score `fscore`, +1 male, -1 female):

    FB = |p_he - f_he| + |p_she - f_she|,   f_he = (1 + fscore) / 2,   f_she = (1 - fscore) / 2

averaged over prompts. It lies in [0, 2]; lower is better, 0 means the model's probabilities
match the real-world shares. It is neither a fairness-as-parity score nor a stereotype score:
a model that always says "she" for nurses is penalised as much as one that never does.

The metric also reports the normalized variant, where p_he and p_she are replaced by
p_he / (p_he + p_she) and its complement (the probability mass on other continuations is
ignored), and, when `category` is given, the per-category means in the column order of the
paper's Table III.
"""

_KWARGS_DESCRIPTION = """
Args:
    p_he (`list` of `float`): the model's probability of "he" right after each prompt.
    p_she (`list` of `float`): the model's probability of "she" right after each prompt.
    fscore (`list` of `float`): the profession's definitional gender score, in [-1, 1].
    category (`list` of `str`, optional): the prompt's modifier category (RoBERTa-Neg,
        Random-Neg, Random-Pos, Comparative-Neg, Comparative-Pos) for per-category means;
        pass it to `compute` (it is not accumulated by `add_batch`).

Returns:
    fb_score (`float`): the mean FB-Score (Eq. 6), in [0, 2], lower is better.
    fb_score_normalized (`float`): the same with p_he / (p_he + p_she) and its complement.
    per_category (`dict`): category -> mean FB-Score (only with `category`).
    per_category_normalized (`dict`): category -> mean normalized FB-Score (only with `category`).

Examples:
    >>> import evaluate
    >>> from mg_editing.metrics import FB_SCORE_PATH
    >>> fb = evaluate.load(FB_SCORE_PATH)
    >>> results = fb.compute(p_he=[0.6, 0.2], p_she=[0.4, 0.7], fscore=[0.2, -0.6],
    ...                      category=["Random-Pos", "Comparative-Neg"])
    >>> round(results["fb_score"], 4)
    0.05
    >>> {k: round(v, 4) for k, v in results["per_category"].items()}
    {'Random-Pos': 0.0, 'Comparative-Neg': 0.1}
"""

_FEATURES = {"p_he": datasets.Value("float64"), "p_she": datasets.Value("float64"), "fscore": datasets.Value("float64")}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FBScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # `category` is a compute-time keyword (evaluate's feature lists cannot hold an
            # optional column), so it is not accumulated by `add_batch`.
            features=datasets.Features(_FEATURES),
            reference_urls=["https://github.com/tolga-b/debiaswe"],
        )

    def _compute(self, p_he, p_she, fscore, category=None):
        result = fb_score(p_he, p_she, fscore, category)
        result.pop("per_prompt")
        result.pop("n")
        return result
