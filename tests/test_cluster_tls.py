"""The README's cluster recipe over TLS: a scheduler that accepts only encrypted, certified
connections, reached through irn's executor with the credentials given in dask's configuration
(as the README sets them with environment variables), on localhost with a throwaway
certificate. A client without the credentials is refused."""

import shutil
import subprocess

import pytest

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for localhost (its own CA), valid for a day."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a throwaway certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_a_sweep_runs_on_a_tls_scheduler_and_a_plain_client_is_refused(certificate):
    from distributed import Client, LocalCluster
    from distributed.security import Security

    from irn.paper import experiments

    cert, key = certificate
    security = Security(tls_ca_file=cert, tls_scheduler_cert=cert, tls_scheduler_key=key,
                        tls_worker_cert=cert, tls_worker_key=key, tls_client_cert=cert,
                        tls_client_key=key, require_encryption=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
                      host="127.0.0.1", security=security, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        # what DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ...CLIENT__CERT, ...CLIENT__KEY set
        credentials = {"distributed.comm.tls.ca-file": cert,
                       "distributed.comm.tls.client.cert": cert,
                       "distributed.comm.tls.client.key": key,
                       "distributed.comm.require-encryption": True}
        with dask.config.set(credentials):
            with experiments.executor(address) as pool:
                assert pool.submit(pow, 2, 10).result(timeout=60) == 1024
        # a client that does not speak TLS is cut off at the handshake
        from distributed.comm.core import CommClosedError

        with pytest.raises((CommClosedError, OSError)):
            with Client(address.replace("tls://", "tcp://"), timeout="3s"):
                pass
        # and one without credentials cannot even open a TLS connection
        with pytest.raises(TypeError, match="TLS"):
            with Client(address, timeout="3s"):
                pass
