from collections.abc import Sequence

from infer_server.messages import ImageOutcome

def image_results(outcomes: Sequence[ImageOutcome], field: int, /) -> bytes: ...
