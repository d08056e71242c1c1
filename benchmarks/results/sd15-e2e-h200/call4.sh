. .carry/setup.sh
el start
mkdir -p $OUT/res
timeout 330 python3 benchmarks/latency.py --arch sd15 --batch 2 8 --bits W8A8 --fuse-norm on --out $OUT/res/sd-compile > $OUT/res/sd-compile.log 2>&1
echo "latency rc $?" | tee -a $LOG; grep "ms/step" $OUT/res/sd-compile.log | tee -a $LOG; tail -3 $OUT/res/sd-compile.log >> $LOG
el latency done
left=$(( 500 - $(date +%s) + T0 ))
timeout $left python3 benchmarks/step_profile.py --arch sd15 --batch 8 --out $OUT/res/prof > $OUT/res/prof.log 2>&1
echo "profile rc $?" | tee -a $LOG; tail -5 $OUT/res/prof.log >> $LOG
el profile done
tar -czf $OUT/res.tgz -C $OUT res && rm -rf $OUT/res
