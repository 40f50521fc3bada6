"""The FINN (finn-plus) backend: a FairCNN's or a timm ResNet's QONNX file built into an
estimate-only dataflow accelerator, run in Python for the bit-exact check, and finished
with Vivado where it is installed.

    steps.py      FINN's flow as named steps and step lists, one loop (`run_steps`)
    transforms.py fqhw's graph rewrites (qonnx Transformations)
    common.py     op types, the build record `FinnBuild`, FINN's environment, tidying
    folding.py    which node is which layer, PE / SIMD, FINN's estimates
    groups.py     output-channel groups: streamlining of forks and joins, matching MVAUs
    build.py      `finn_build`: a FairCNN (PLAIN_STEPS / GROUPS_STEPS)
    residual.py   `finn_dataflow_resnet`: a ResNet (RESIDUAL_STEPS); what FINN refuses
    execute.py    the integers a build computes; FINN's thresholds checked
    synth.py      what Vivado needs to finish a build, and `finn_synth`
    backend.py    the backend as the registry sees it (fqhw.backends.base)
"""
