. .carry/setup.sh
el start
mkdir -p $OUT/res
timeout 100 python3 -m pytest -q -m cuda -n 4 tests/triton/test_geglu.py tests/nn/test_qfeedforward.py > $OUT/res/tests.log 2>&1; tail -4 $OUT/res/tests.log | tee -a $LOG
el geglu tests done
timeout 140 python3 benchmarks/latency.py --arch sd15 --batch 2 8 --bits W8A8 --no-compile --fuse-norm on --out $OUT/res/sd-geglu > $OUT/res/sd-geglu.log 2>&1
echo "latency rc $?" | tee -a $LOG; grep "ms/step" $OUT/res/sd-geglu.log | tee -a $LOG
el latency done
timeout 110 python3 -c "from tcaq_kernels.ops import cuda_ext; cuda_ext.load_sm90()" > $OUT/res/build.log 2>&1; echo "build rc $?" | tee -a $LOG
el build done
timeout 50 python3 -m pytest -q -m cuda tests/csrc/test_cuda_ops.py -k route > $OUT/res/route.log 2>&1; tail -3 $OUT/res/route.log | tee -a $LOG
el route test done
left=$(( 560 - $(date +%s) + T0 ))
TCAQ_CUTLASS_GEMM=1 timeout $left python3 benchmarks/latency.py --arch sd15 --batch 2 8 --bits W8A8 --no-compile --fuse-norm on --out $OUT/res/sd-cutlass > $OUT/res/sd-cutlass.log 2>&1
echo "latency cutlass rc $?" | tee -a $LOG; grep "ms/step" $OUT/res/sd-cutlass.log | tee -a $LOG
el cutlass latency done
tar -czf $OUT/res.tgz -C $OUT res && rm -rf $OUT/res
