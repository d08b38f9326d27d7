"""What composes the two stages: ``tagclip segment`` (tags -> CAMs -> masks), ``tagclip demo``,
``tagclip prepare`` (split files of both stages) and the ``tagclip`` command that dispatches them.
Neither stage imports this package."""
