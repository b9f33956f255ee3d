"""The Responses API (`/v1/responses`), bridged onto the chat pipeline.

A Responses request becomes the chat request the pipeline already serves (`request.py`), its chat answer
becomes a Response object or event stream (`translate.py`), and stored responses continue conversations
(`store.py`, `chain.py`). `bridge.py` composes them; `retrieval.py` answers GET/DELETE on stored ones.

Nothing is imported here: `gateway.pipeline` imports `gateway.responses.memory` (its default store), and
the bridge imports the pipeline.
"""
