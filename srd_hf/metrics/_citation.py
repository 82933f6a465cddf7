"""BibTeX of the SRD paper, shared by the metric modules that implement its scores."""

SRD_CITATION = """\
@inproceedings{xu2026srd,
  title     = {{SRD}: Reinforcement-Learned Semantic Perturbation for Backdoor Defense in {VLMs}},
  author    = {Xu, Shuhan and Liang, Siyuan and Zheng, Hongling and Liu, Aishan and Wang, Xinbiao
               and Luo, Yong and Lin, Fu and Rutkowski, Leszek and Tao, Dacheng},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2026},
  note      = {arXiv:2506.04743}
}
"""
