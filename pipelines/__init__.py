"""pipelines: orchestration on Ray (collect, pretrain, serve, train, evaluate) and the CLI."""

__version__ = "0.1.0"
