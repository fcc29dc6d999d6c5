-- set_virtual_queues: replace the virtual queues of several workers at once.
--
-- KEYS[1 .. w]     vq:{worker} for each worker, in the order of ARGV
-- KEYS[w+1]        workers     set of known workers
-- KEYS[w+2]        scheduler:fence  the fencing token of the current leader's term
-- ARGV[1]          w           number of workers
-- ARGV[2 .. w+1]               worker ids
-- ARGV[w+2 .. 2w+1]            length of each worker's new order
-- ARGV[2w+2 ..]                the group keys of all orders, concatenated, head first
-- ARGV[#ARGV]      fence       the writer's fencing token ("0": no check)
--
-- Returns the number of workers updated. An empty order deletes the list; the
-- worker stays known. Returns -1 and writes nothing when ``fence`` is not the current
-- fencing token: a scheduler that lost its lease (a newer term began) cannot overwrite
-- the orders of the new leader, however late its write arrives.

local w = tonumber(ARGV[1])
local fence = ARGV[#ARGV]
if fence ~= '0' and redis.call('GET', KEYS[w + 2]) ~= fence then
  return -1
end
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
