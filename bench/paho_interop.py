"""Eclipse Paho's MQTT 3.1.1 interoperability client tests against the gateway's embedded broker.

    git clone https://github.com/eclipse/paho.mqtt.testing /tmp/paho.mqtt.testing
    .venv/bin/python bench/paho_interop.py /tmp/paho.mqtt.testing/interoperability

The suite's ``client_test.py`` (not part of this repository) runs against ``iotgw run`` in a
subprocess, with a config whose ACL denies ``test/nosubscribe`` (the suite's subscribe-failure test)
and allows everything else. Its ten tests run as its own ``__main__`` block would run them (that block
cannot be given a port: ``-h`` is taken for ``--help``), and the count of those passed is printed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import free_port, start_gateway

RUNNER = """
import logging, sys, unittest
sys.argv = ["client_test"]
import client_test as suite
suite.host, suite.port = "127.0.0.1", {port}
suite.topics = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
suite.wildtopics = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
suite.nosubscribe_topics = ("test/nosubscribe",)
logging.getLogger().setLevel(logging.CRITICAL)
result = unittest.main(module=suite, argv=["client_test"], exit=False, verbosity=2).result
print(f"RESULT {{result.testsRun}} {{len(result.failures) + len(result.errors)}}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path, help="paho.mqtt.testing's interoperability folder (with client_test.py)")
    args = parser.parse_args()
    if not (args.suite / "client_test.py").is_file():
        parser.error(f"no client_test.py in {args.suite}")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gw.toml"
        config.write_text(f'site = "interop"\n[broker]\nport = {port}\nallow_anonymous = true\n'
                          'acl_default = "readwrite"\n[[broker.acl]]\ntopic = "test/nosubscribe"\naccess = "deny"\n'
                          f'[storage]\ndata_dir = "{Path(tmp) / "data"}"\n')
        gateway = start_gateway(config, port, stderr=subprocess.PIPE)
        try:
            run = subprocess.run([sys.executable, "-W", "ignore", "-c", RUNNER.format(port=port)], cwd=args.suite,
                                 capture_output=True, text=True, timeout=600, check=False)
        finally:
            gateway.terminate()
            _, err = gateway.communicate(timeout=60)
    for line in run.stderr.splitlines():
        if line.startswith(("FAIL:", "ERROR:")):
            print(line)
    found = re.search(r"RESULT (\d+) (\d+)", run.stdout)
    if found is None:
        print(run.stdout[-2000:], run.stderr[-2000:], sep="\n")
        return 1
    ran, failed = int(found[1]), int(found[2])
    print(f"Eclipse Paho interoperability (client_test.py, MQTT 3.1.1): {ran - failed}/{ran} passed")
    if "Traceback" in err:
        print("the gateway logged a traceback:\n" + err[-3000:])
        return 1
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
