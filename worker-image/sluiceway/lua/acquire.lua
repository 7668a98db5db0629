-- Lease rate-limit slots without touching a queue: for brokers other than Redis, whose messages
-- are fetched after the slots are granted. Same arithmetic as fetch.lua and ratelimit.py.
-- KEYS: 1 ratelimit
-- ARGV: 1 qps  2 burst  3 horizon µs  4 wanted
-- Returns: {count, first_offset_us, interval_us, retry_after_us, new_tat, now_us}
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local step = 1000000 / tonumber(ARGV[1])
local start = now_us - tonumber(ARGV[2]) * step
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
if tat and tat > start then start = tat end
local latest = now_us + tonumber(ARGV[3])
local wanted = tonumber(ARGV[4])
if wanted <= 0 or start > latest then
  return {0, string.format('%.3f', start - now_us), string.format('%.3f', step),
          string.format('%.3f', math.max(0, start - latest)), '', string.format('%.0f', now_us)}
end
local count = math.min(wanted, math.floor((latest - start) / step) + 1)
local new_tat = string.format('%.3f', start + count * step)
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((start + count * step - now_us) / 1000) + 60000)
return {count, string.format('%.3f', start - now_us), string.format('%.3f', step), '0', new_tat,
        string.format('%.0f', now_us)}
