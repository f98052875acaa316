"""launch/ scripts: `--dry-run` prints complete, correct command sequences (parsed back with shlex)."""

import os
import re
import shlex
import subprocess

import pytest

from conftest import HERE

REPO = os.path.dirname(HERE)
TPU = os.path.join(REPO, 'launch', 'tpu_vm.sh')
GPU = os.path.join(REPO, 'launch', 'gpu_single_node.sh')
TPU_ENV = {'TPU_NAME': 'pod1', 'ZONE': 'us-central2-b', 'PROJECT': 'my-proj', 'BUCKET': 'gs://my-bucket/'}
LOCATION = ['--project=my-proj', '--zone=us-central2-b']


def dry_run(script, *args, **env):
  environ = {key: value for key, value in os.environ.items() if key not in TPU_ENV and key != 'WORKDIR'}
  environ.update(TMPDIR='/tmp', **env)
  result = subprocess.run(['bash', script, '--dry-run', *args], capture_output=True, text=True, env=environ,
                          timeout=60)
  return result


def commands(result):
  """The `+ ...` lines of a dry run, each parsed back into its argv."""
  assert result.returncode == 0, result.stderr
  return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith('+ ')]


def remote_command(argv):
  flags = [arg for arg in argv if arg.startswith('--command=')]
  assert len(flags) == 1, argv
  return flags[0][len('--command='):]


def test_scripts_parse():
  for script in (TPU, GPU, os.path.join(REPO, 'launch', 'common.sh')):
    subprocess.run(['bash', '-n', script], check=True)


def test_tpu_all_prints_create_install_run_delete():
  argvs = commands(dry_run(TPU, 'all', '--', '--config.train.batch_size=128',
                           '--config.tokenizer.path=/tmp/my tok.json', **TPU_ENV, MESH_DATA='2',
                           MESH_FSDP='4'))
  archive = '/tmp/protoseg_jax-pod1.tar.gz'
  assert argvs[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod1', *LOCATION,
                      '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base']
  assert argvs[1] == ['git', '-C', REPO, 'archive', '--format=tar.gz', f'--output={archive}', 'HEAD']
  assert argvs[2] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive, 'pod1:protoseg_jax.tar.gz',
                      *LOCATION, '--worker=all']
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod1', *LOCATION, '--worker=all']
  assert argvs[3][:-1] == ssh and argvs[4][:-1] == ssh
  assert argvs[5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod1', *LOCATION, '--quiet']
  assert len(argvs) == 6

  install = remote_command(argvs[3]).split(' && ')
  assert install[:5] == ['rm -rf ~/protoseg_jax', 'mkdir -p ~/protoseg_jax',
                         'tar -xzf ~/protoseg_jax.tar.gz -C ~/protoseg_jax',
                         "python3 -m pip install -U 'jax[tpu]'", 'python3 -m pip install -e ~/protoseg_jax']
  assert 'apt-get install -y -q gcsfuse' in remote_command(argvs[3])
  assert install[-1] == 'gcloud storage cp -r gs://my-bucket/BCSS-WSSS /tmp/protoseg_data/'

  run = remote_command(argvs[4])
  subprocess.run(['bash', '-n', '-c', run], check=True)  # the remote command is valid shell
  steps = run.split(' && cd ~/protoseg_jax && ')
  assert steps[0].startswith('{ mountpoint -q /gcs/my-bucket || {') and 'gcsfuse --implicit-dirs my-bucket ' \
      '/gcs/my-bucket' in steps[0]
  loop = re.fullmatch(r'n=0; while :; do (.*); rc=\$\?; if \[ "\$rc" -ne 75 \] \|\| \[ "\$n" -ge 3 \]; then '
                      r'exit "\$rc"; fi; n=\$\(\(n \+ 1\)\); done', steps[1])
  assert loop, steps[1]  # reruns while the run exits 75 (preempted after saving), at most 3 times
  assert shlex.split(loop.group(1)) == [
      'python3', '-m', 'protoseg_jax.main', '--config=configs/bcss.py',
      '--workdir=/gcs/my-bucket/protoseg_runs/pod1', '--config.data.root=/tmp/protoseg_data/BCSS-WSSS',
      '--config.mesh.data=2', '--config.mesh.fsdp=4', '--config.mesh.tensor=1',
      '--config.sharding.distributed=on', '--config.train.batch_size=128',
      '--config.tokenizer.path=/tmp/my tok.json']


def test_tpu_queued_all_uses_queued_resources_and_spot():
  result = dry_run(TPU, 'all', **TPU_ENV, QUEUED='1', SPOT='1', ACCELERATOR_TYPE='v5litepod-16',
                   RUNTIME_VERSION='v2-alpha-tpuv5-lite')
  argvs = commands(result)
  assert argvs[0] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'pod1-qr', '--node-id=pod1',
                      *LOCATION, '--accelerator-type=v5litepod-16', '--runtime-version=v2-alpha-tpuv5-lite',
                      '--spot']
  assert argvs[1] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'pod1-qr', *LOCATION,
                      '--format=value(state.state)']
  assert '# poll every 60s until the state is ACTIVE:' in result.stdout
  assert argvs[-1] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'pod1-qr', *LOCATION,
                       '--force', '--quiet']
  assert argvs[2][:4] == ['git', '-C', REPO, 'archive']
  assert [argv[3:5] for argv in argvs[3:-1]] == [['tpu-vm', 'scp'], ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh']]
  assert len(argvs) == 7


def test_tpu_run_detached_and_custom_workdir():
  argvs = commands(dry_run(TPU, 'run', **TPU_ENV, DETACH='1', WORKDIR='/gcs/my-bucket/exp7',
                           CONFIG='configs/demo.py', MESH_DATA='1', MESH_TENSOR='8'))
  assert len(argvs) == 1
  run = remote_command(argvs[0])
  assert run.startswith('nohup bash -c ') and run.endswith(' > ~/protoseg_run.log 2>&1 &')
  inner = shlex.split(run[len('nohup bash -c '):-len(' > ~/protoseg_run.log 2>&1 &')])[0]
  main_argv = shlex.split(inner.split(' && cd ~/protoseg_jax && ')[1])
  assert '--workdir=/gcs/my-bucket/exp7' in main_argv and '--config=configs/demo.py' in main_argv
  assert '--config.mesh.data=1' in main_argv and '--config.mesh.tensor=8' in main_argv


@pytest.mark.parametrize('missing', ['TPU_NAME', 'ZONE', 'PROJECT', 'BUCKET'])
def test_tpu_missing_variable_is_named(missing):
  env = {key: value for key, value in TPU_ENV.items() if key != missing}
  result = dry_run(TPU, 'run', **env)
  assert result.returncode == 2
  assert f'set {missing}' in result.stderr and '+ ' not in result.stdout


def test_tpu_unknown_command():
  result = dry_run(TPU, 'launch-rockets', **TPU_ENV)
  assert result.returncode == 2 and 'unknown command launch-rockets' in result.stderr


def test_gpu_single_node():
  argvs = commands(dry_run(GPU, '--', '--config.train.batch_size=32', WORKDIR='/runs/x', GPUS='0,1,2,3',
                           MESH_FSDP='2', DATA_DIR='/data/BCSS-WSSS'))
  assert argvs == [['env', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9', 'CUDA_VISIBLE_DEVICES=0,1,2,3', 'python3',
                    '-m', 'protoseg_jax.main', '--config=configs/bcss.py', '--workdir=/runs/x',
                    '--config.data.root=/data/BCSS-WSSS', '--config.mesh.data=-1', '--config.mesh.fsdp=2',
                    '--config.mesh.tensor=1', '--config.sharding.distributed=off',
                    '--config.train.batch_size=32']]
  result = dry_run(GPU)
  assert result.returncode == 2 and 'set WORKDIR' in result.stderr


@pytest.mark.parametrize('codes, calls, final', [((75, 75, 0), 3, 0), ((75, 75, 75, 75, 75), 4, 75),
                                                 ((2,), 1, 2), ((0,), 1, 0)])
def test_gpu_script_reruns_a_preempted_run(tmp_path, codes, calls, final):
  """A fake `python` exits with each code in turn: the script reruns after 75 (preempted, checkpoint
  saved) at most MAX_RESUMES=3 more times, stops on any other code and returns it."""
  counter, fake = tmp_path / 'calls', tmp_path / 'fake_python'
  fake.write_text('#!/usr/bin/env bash\n'
                  f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}\n'
                  f'codes=({" ".join(map(str, codes))}); exit "${{codes[$n]}}"\n')
  fake.chmod(0o755)
  environ = {key: value for key, value in os.environ.items() if key not in TPU_ENV}
  environ.update(WORKDIR=str(tmp_path / 'run'), PYTHON=str(fake), MAX_RESUMES='3')
  result = subprocess.run(['bash', GPU], capture_output=True, text=True, env=environ, timeout=60)
  assert result.returncode == final, result.stderr
  assert int(counter.read_text()) == calls
