-- Hand back the last slots of a rate-limit lease, only when no later lease exists (the limiter
-- state still equals what this lease left). Same arithmetic as ratelimit/gcra.py:release.
-- KEYS: 1 ratelimit
-- ARGV: 1 expected tat (µs, as the lease returned it)  2 slot interval µs  3 slots to hand back
-- Returns 1 when the slots went back, 0 when a later lease made that unsafe.
local slots = tonumber(ARGV[3])
if ARGV[1] == '' or slots <= 0 then return 0 end
local tat = redis.call('GET', KEYS[1])
if tat ~= ARGV[1] then return 0 end
local back = tonumber(tat) - slots * tonumber(ARGV[2])
redis.call('SET', KEYS[1], string.format('%.3f', back), 'KEEPTTL')
return 1
