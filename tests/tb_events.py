"""Read the scalar and text tags of tensorboardX event files (TFRecord framing)."""
import glob
import os
import struct

from tensorboardX.proto import event_pb2


def read_events(logdir):
    """All events of every event file directly in ``logdir``."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            events.append(event_pb2.Event.FromString(record))
    return events


def tags(logdir):
    """Tags as TensorBoard shows them (tensorboardX stores text under ``<tag>/text_summary``)."""
    return {v.tag.removesuffix("/text_summary") for e in read_events(logdir)
            for v in e.summary.value}


def scalars(logdir, tag):
    """(step, value) pairs of a scalar tag."""
    return [(e.step, v.simple_value) for e in read_events(logdir) for v in e.summary.value
            if v.tag == tag]
