"""AlphaEdit demo Space: change a fact in a language model and see what the edit did.

The app is `hf-alphaedit demo` (hf_alphaedit/demo) with the settings in `demo.yaml` next to this file: the model,
where its key statistics come from, and the limits that keep a public Space responsive. Flags given on the command
line override the file, e.g. offline next to a checkout:

    python spaces/alphaedit-demo/app.py --statistics_corpus ../shared/data/wikitext-2/valid.txt

On Spaces the runtime's $GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT (0.0.0.0:7860) apply; locally it serves
127.0.0.1:7860. Endpoints for gradio_client: /edit, /ask, /undo, /reset, /history, /room, /download_lora, /push.
"""

import sys
from pathlib import Path

from hf_alphaedit.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", "--config", str(Path(__file__).resolve().with_name("demo.yaml")), *sys.argv[1:]]))
