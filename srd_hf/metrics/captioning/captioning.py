"""COCO caption metrics (BLEU-1..4, CIDEr-D, ROUGE-L, METEOR) with no Java needed."""

import datasets
import evaluate

from srd_hf.metrics._captioning import MeteorRunner, caption_scores, java_available
from srd_hf.metrics._validation import check_same_length, check_string_lists, check_strings

_CITATION = """\
@inproceedings{papineni2002bleu,
  title = {{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author = {Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle = {Proceedings of ACL}, year = {2002}
}
@inproceedings{vedantam2015cider,
  title = {{CIDEr}: Consensus-based Image Description Evaluation},
  author = {Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {Proceedings of CVPR}, year = {2015}
}
@inproceedings{lin2004rouge,
  title = {{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author = {Lin, Chin-Yew},
  booktitle = {Text Summarization Branches Out}, year = {2004}
}
@inproceedings{denkowski2014meteor,
  title = {Meteor Universal: Language Specific Translation Evaluation for Any Target Language},
  author = {Denkowski, Michael and Lavie, Alon},
  booktitle = {Proceedings of the EACL 2014 Workshop on Statistical Machine Translation}, year = {2014}
}
@article{chen2015microsoft,
  title = {Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author = {Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh
            and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal = {arXiv:1504.00325}, year = {2015}
}
"""

_DESCRIPTION = """\
Corpus-level COCO caption metrics as reported in captioning and backdoor papers (the SRD paper
reports BLEU-4 and CIDEr): BLEU-1..4, CIDEr-D and ROUGE-L computed with pycocoevalcap's own
pure-Python scorers, after a Java-free re-implementation of the PTB tokenisation that
pycocoevalcap applies (lowercase, clitics split as in "dog 's", punctuation removed).
METEOR needs Java: it is computed only when `java` is found and pycocoevalcap's METEOR runs;
otherwise `meteor` is None and `meteor_available` is False (never a fake 0).

Scores are in pycocoevalcap's units (BLEU and ROUGE-L in [0, 1], CIDEr-D in [0, 10]);
`scale=100` gives the units of most papers (BLEU-4 36.2, CIDEr 112.5). CIDEr-D computes its
document frequencies from the evaluated corpus, so it needs several images: a one-image corpus
always scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per image.
    references (`list` of `list` of `str`): ground-truth captions per image (at least one each).
    scale (`float`, optional): multiplies every score; defaults to the load-time value (1.0).
    use_meteor (`bool`, optional): compute METEOR (needs Java). Defaults to the load-time value,
        which is "if Java is found".

Returns:
    bleu_1, bleu_2, bleu_3, bleu_4 (`float`): corpus BLEU-n (closest reference length for the
        brevity penalty, as pycocoevalcap), in [0, 1] x scale.
    cider (`float`): corpus CIDEr-D (pycocoevalcap's Cider: clipped n-gram counts, Gaussian length
        penalty, x10), in [0, 10] x scale.
    rouge_l (`float`): mean sentence ROUGE-L F-score (beta 1.2), in [0, 1] x scale.
    meteor (`float` or None): METEOR 1.5, in [0, 1] x scale; None when not computed.
    meteor_available (`bool`): whether `meteor` was computed.
    n_samples (`int`): number of images.

Examples:
    >>> from srd_hf.metrics import load
    >>> captioning = load("captioning", use_meteor=False)
    >>> out = captioning.compute(
    ...     predictions=["A man riding a horse on a beach.",
    ...                  "Two dogs are playing with a ball in the grass.",
    ...                  "A plate of food with broccoli and rice."],
    ...     references=[["A man rides a horse along the beach.", "A man riding a brown horse on the beach."],
    ...                 ["Two dogs playing with a ball on the grass.", "Dogs are playing in the grass."],
    ...                 ["A plate with rice and broccoli.", "A white plate of food with broccoli and rice on it."]],
    ... )
    >>> {k: round(v, 4) for k, v in out.items() if isinstance(v, float)}
    {'bleu_1': 0.9615, 'bleu_2': 0.9144, 'bleu_3': 0.7719, 'bleu_4': 0.6347, 'cider': 4.0246, 'rouge_l': 0.8469}
    >>> out["meteor"], out["meteor_available"]
    (None, False)

    A corpus scored against itself reaches the CIDEr-D maximum, 10 (1000 with scale=100):

    >>> caps = ["a cat on a mat", "a dog in the park", "a red car on the street"]
    >>> captioning.compute(predictions=caps, references=[[c] for c in caps], scale=100)["cider"]
    1000.0
"""

_COMPUTE_ARGS = ("scale", "use_meteor")


def _check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Captioning(evaluate.Metric):
    """COCO caption metrics. Load-time options: ``scale`` (1.0), ``use_meteor`` (Java found?),
    ``tokenize`` (True: PTB-like tokenisation; False: split on whitespace only)."""

    def __init__(self, scale=1.0, use_meteor=None, tokenize=True, **kwargs):
        self.scale = _check_scale(scale)
        self.use_meteor = java_available() if use_meteor is None else bool(use_meteor)
        self.tokenize = bool(tokenize)
        self._meteor = MeteorRunner()
        super().__init__(**kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
            reference_urls=["https://arxiv.org/abs/1504.00325"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute the caption metrics; inputs are checked before anything is cached."""
        unknown = sorted(set(kwargs) - set(_COMPUTE_ARGS))
        if unknown:
            raise TypeError(f"Unknown argument(s) for captioning: {unknown}; allowed: {list(_COMPUTE_ARGS)}")
        if kwargs.get("scale") is not None:
            _check_scale(kwargs["scale"])
        if predictions is not None or references is not None:
            predictions = check_strings("predictions", predictions)
            references = check_string_lists("references", references)
            check_same_length("predictions", predictions, "references", references)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, scale=None, use_meteor=None):
        predictions = check_strings("predictions", predictions)
        references = check_string_lists("references", references)
        check_same_length("predictions", predictions, "references", references)
        return caption_scores(
            predictions,
            references,
            scale=self.scale if scale is None else _check_scale(scale),
            use_meteor=self.use_meteor if use_meteor is None else bool(use_meteor),
            tokenize=self.tokenize,
            meteor_runner=self._meteor,
        )
