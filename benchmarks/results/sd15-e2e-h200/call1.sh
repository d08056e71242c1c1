. .carry/setup.sh
el start
mkdir -p $OUT/res
timeout 400 python3 benchmarks/latency.py --arch sd15 --batch 2 8 --bits W8A8 W4A8 --no-compile --fuse-norm on --float-attention --out $OUT/res/sd > $OUT/res/sd.log 2>&1
echo "latency rc $?" | tee -a $LOG; grep "ms/step" $OUT/res/sd.log | tee -a $LOG; tail -5 $OUT/res/sd.log >> $LOG
el latency done
left=$(( 540 - $(date +%s) + T0 ))
timeout $left python3 benchmarks/step_profile.py --arch sd15 --batch 8 --out $OUT/res/prof > $OUT/res/prof.log 2>&1
echo "profile rc $?" | tee -a $LOG; head -40 $OUT/res/prof/step_profile.md >> $LOG 2>/dev/null; tail -5 $OUT/res/prof.log >> $LOG
el profile done
tar -czf $OUT/res.tgz -C $OUT res && rm -rf $OUT/res
