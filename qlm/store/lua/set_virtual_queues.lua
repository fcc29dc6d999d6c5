-- set_virtual_queues: replace the virtual queues of several workers at once.
--
-- KEYS[1 .. w]     vq:{worker} for each worker, in the order of ARGV
-- KEYS[w+1]        workers     set of known workers
-- ARGV[1]          w           number of workers
-- ARGV[2 .. w+1]               worker ids
-- ARGV[w+2 .. 2w+1]            length of each worker's new order
-- ARGV[2w+2 ..]                the group keys of all orders, concatenated, head first
--
-- Returns the number of workers updated. An empty order deletes the list; the
-- worker stays known.

local w = tonumber(ARGV[1])
local pos = 2 * w + 2
for i = 1, w do
  local vq = KEYS[i]
  local n = tonumber(ARGV[w + 1 + i])
  redis.call('DEL', vq)
  local last = pos + n - 1
  for j = pos, last, 500 do
    redis.call('RPUSH', vq, unpack(ARGV, j, math.min(j + 499, last)))
  end
  pos = last + 1
  redis.call('SADD', KEYS[w + 1], ARGV[1 + i])
end
return w
