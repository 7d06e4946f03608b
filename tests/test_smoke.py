import numpy as np
import paho.mqtt.client as mqtt

from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import list_images, read_image


def test_small_artifact_scores_defects_higher(small_artifact, sample_data):
    inspector = Inspector(small_artifact, device="cpu")
    good = [inspector.inspect(read_image(p)).score for p in list_images(sample_data / "test" / "good")]
    bad = [inspector.inspect(read_image(p)).score for p in list_images(sample_data / "test" / "spot")]
    assert np.mean(bad) > np.mean(good)


def test_broker_fixture_delivers(mosquitto):
    got = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("t/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    import time
    time.sleep(0.3)
    pub.publish("t/x", b"hello", qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    pub.loop_stop(); sub.loop_stop()
    assert got == [b"hello"]
