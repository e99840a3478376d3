"""The `rlhf-fast` command line: argument parsing, file checks and messages only.

    app.py     the parser and the dispatch of `sft | rm | ppo | eval | demo | bench`, exit statuses
    common.py  options shared by the commands, config resolution, errors naming file:line:field
    train.py   `sft`, `rm`, `ppo`: read and check the data, build the trainer, run it
    eval.py    `eval`: generate with the policy and baseline, judge, write the report

Domain work (training, generation, scoring) lives in the layers below.
"""

from rlhf_fast.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
