"""Tags a stage sets once its work is done (``run.send(set_tags, {...})``): values known only
then, such as the md5s of what it trained on and wrote."""

from __future__ import annotations


def set_tags(recorder, tags: dict[str, str], parent: bool = True) -> None:
    """``tags`` on the stage's run and, with ``parent``, on the execution's parent run."""
    for key, value in sorted(tags.items()):
        recorder.client.set_tag(recorder.run_id, key, value)
        if parent and recorder.parent_id:
            recorder.client.set_tag(recorder.parent_id, key, value)
